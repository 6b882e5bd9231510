/* The sort eval as a game for a human judge: one pair at a time, answer A or B. Answers are
   kept in localStorage (a reload resumes) and saved as answers.jsonl, which the command the
   page shows (`vitscope sorteval RUN --judge human ... --answers answers.jsonl`) scores. The page never sees
   which feature is the true one. */
"use strict";

var VS = {};

function storageKey() {
  return `vitscope-sortgame:${VS.trials.id}`;
}

function loadAnswers() {
  return JSON.parse(localStorage.getItem(storageKey()) || "{}");
}

function fillGrid(element, rows) {
  element.replaceChildren(...rows.map((row) => {
    const img = document.createElement("img");
    img.src = `images/${row}.jpg`;
    img.alt = `image ${row}`;
    return img;
  }));
}

function show() {
  const answers = loadAnswers();
  const { pairs, command } = VS.trials;
  const next = pairs.find((p) => !(p.pair in answers));
  const count = Object.keys(answers).length;
  document.getElementById("progress").textContent = `${count} of ${pairs.length} answered`;
  // Each line names the trial set it answers, so the command refuses answers to another eval.
  const lines = Object.entries(answers).map(([pair, answer]) =>
    JSON.stringify({ trials: VS.trials.id, pair: Number(pair), answer }));
  const save = document.getElementById("save");
  save.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "application/x-ndjson" }));
  save.title = command;
  document.getElementById("command").textContent = command;
  document.getElementById("trial").hidden = !next;
  document.getElementById("done").hidden = Boolean(next);
  if (!next) return;
  document.body.dataset.pair = next.pair;
  fillGrid(document.getElementById("grid-a"), next.rows_a);
  fillGrid(document.getElementById("grid-b"), next.rows_b);
  document.getElementById("query").src = `images/${next.query}.jpg`;
}

function answer(letter) {
  const pair = document.body.dataset.pair;
  if (pair === undefined || document.getElementById("trial").hidden) return;
  const answers = loadAnswers();
  answers[pair] = letter;
  localStorage.setItem(storageKey(), JSON.stringify(answers));
  show();
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("answer-a").addEventListener("click", () => answer("A"));
  document.getElementById("answer-b").addEventListener("click", () => answer("B"));
  document.addEventListener("keydown", (event) => {
    if (event.key === "a" || event.key === "b") answer(event.key.toUpperCase());
  });
  show();
});
