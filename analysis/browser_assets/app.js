/* The feature browser. index.html: every feature in a sortable, paged table. feature.html?f=ID:
   one feature's stats and top images, its patch activations drawn over each on a canvas.
   Data comes from scripts assigning into VS (data/index.js; data/block_NNNNN.js inserted on
   demand), because pages opened from file:// may not fetch(). */
"use strict";

var VS = { blocks: {}, layers: [] };

const PAGE_ROWS = 100;
const COLUMNS = [
  ["feature", "feature"],
  ["freq_tokens", "freq (tokens)"],
  ["freq_images", "freq (images)"],
  ["fire_tokens", "tokens fired"],
  ["fire_images", "images fired"],
  ["mean_act", "mean act"],
  ["max_act", "max act"],
  ["morans_i", "Moran's I"],
  ["morans_images", "images (Moran's I)"],
  ["ms", "MS"],
];

/* The columns this site's data has (Moran's I from analysis version 1.2 on; MS only after
   `vitscope monosemanticity`). */
function shownColumns(features) {
  return COLUMNS.filter(([name]) => name in features);
}

/* The features' words (data/labels.js): named by `vitscope monosemanticity` with a CLIP model's
   text tower, else VS.labels.missing says why there are none. */
function named() {
  return Boolean(VS.labels && VS.labels.vocabulary);
}

/* Feature f's best labels, best first, as [label, score]. */
function bestLabels(f) {
  const top = VS.labels.top[f];
  const labels = [];
  for (let i = 0; i < top.length; i += 2) labels.push([VS.labels.vocabulary[top[i]], top[i + 1]]);
  return labels;
}

function labelText([label, score]) {
  return `${label} ${score.toFixed(3)}`;
}

function escapeHtml(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span.innerHTML;
}

const STOP_WORDS = new Set(["a", "an", "the", "of", "in", "on", "with", "and", "photo"]);

function words(text) {
  return text.toLowerCase().split(/[^\p{L}\p{N}]+/u).filter((w) => w && !STOP_WORDS.has(w));
}

/* The vocabulary labels that best match the typed text, best first: the label itself, then
   labels holding the text's words in a run ("car" -> "sports car", not "scarf"), then labels
   the text holds so ("a red car" -> "car"), then labels the text is a piece of ("tab" ->
   "tabby cat"), then labels sharing words with it (by the share of the label's words); shorter
   labels first among equals. */
function matchLabels(text, most) {
  const query = text.trim().toLowerCase();
  const queryRun = ` ${words(query).join(" ")} `;
  const found = [];
  VS.labels.vocabulary.forEach((label, index) => {
    const name = label.toLowerCase();
    const labelWords = words(name);
    const labelRun = ` ${labelWords.join(" ")} `;
    let score = 0;
    if (name === query) score = 5;
    else if (queryRun.trim() && labelRun.includes(queryRun)) score = 4;
    else if (labelWords.length && queryRun.includes(labelRun)) score = 3;
    else if (query && name.includes(query)) score = 2;
    else if (labelWords.length) {
      score = labelWords.filter((w) => queryRun.includes(` ${w} `)).length / labelWords.length;
    }
    if (score > 0) found.push({ index, label, score });
  });
  found.sort((a, b) => b.score - a.score || a.label.length - b.label.length || a.index - b.index);
  return found.slice(0, most);
}

/* The search box on the index: typed text -> the best matching labels, each with the features
   nearest it (ranked by `vitscope browse`), linked to their pages. */
function setUpSearch() {
  const form = document.querySelector("form.search");
  const note = document.getElementById("search-note");
  if (!named()) {
    note.textContent = `no text search: ${VS.labels ? VS.labels.missing : "no data/labels.js"}`;
    return;
  }
  form.hidden = false;
  note.textContent = `features named by ${VS.labels.about}`;
  note.classList.toggle("warning", VS.labels.random);
  const results = document.getElementById("search-results");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    results.replaceChildren();
    const matches = matchLabels(form.text.value, 3);
    if (matches.length === 0) {
      results.textContent = `no label matches "${form.text.value}"; try a word of the vocabulary`;
    }
    for (const { index, label } of matches) {
      const section = document.createElement("section");
      section.className = "match";
      const heading = document.createElement("h3");
      heading.textContent = label;
      const list = document.createElement("ol");
      const ranked = VS.labels.search[index];
      for (let i = 0; i < ranked.length; i += 2) {
        const item = document.createElement("li");
        const link = document.createElement("a");
        link.href = featureUrl(ranked[i]);
        link.textContent = `feature ${ranked[i]}`;
        const best = bestLabels(ranked[i]);
        const rest = ` ${ranked[i + 1].toFixed(3)}` + (best.length ? ` · ${best[0][0]}` : "");
        item.append(link, rest);
        list.append(item);
      }
      section.append(heading, list);
      results.append(section);
    }
  });
}

function format(value) {
  if (value === null || Number.isNaN(value)) return "–";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return value === 0 ? "0" : value.toPrecision(3);
}

function featureUrl(feature) {
  return `feature.html?f=${feature}`;
}

/* The jump box on both pages: a valid feature id opens its page. */
function setUpJump(nFeatures) {
  const form = document.querySelector("form.jump");
  form.feature.max = nFeatures - 1;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const feature = Number(form.feature.value);
    if (Number.isInteger(feature) && feature >= 0 && feature < nFeatures) {
      location.href = featureUrl(feature);
    } else {
      form.querySelector(".jump-error").textContent = `no feature ${form.feature.value}`;
    }
  });
}

function showIndex() {
  const { meta, features } = VS.index;
  const n = meta.n_features;
  const shown = shownColumns(features);
  const columns = {};
  for (const [name] of shown) columns[name] = Float64Array.from(features[name], (v) => v ?? NaN);
  if (named()) {
    // The best label's text, sorted by its score (features without a label last).
    shown.push(["label", "best label"]);
    columns.label = Float64Array.from(VS.labels.top, (top) => (top.length ? top[1] : NaN));
  }
  const cell = (name, f) => {
    if (name !== "label") return format(features[name][f]);
    const best = bestLabels(f);
    return best.length ? escapeHtml(labelText(best[0])) : "–";
  };
  const hash = new URLSearchParams(location.hash.slice(1));
  const state = {
    sort: hash.get("sort") in columns ? hash.get("sort") : "feature",
    dir: hash.get("dir") === "-1" ? -1 : 1,
    page: Number(hash.get("page")) || 0,
  };
  let order = new Uint32Array(n);
  const pages = Math.ceil(n / PAGE_ROWS);

  document.title = `${meta.sae}: features`;
  document.getElementById("title").textContent = `${meta.sae} · layer ${meta.layer}`;
  document.getElementById("count").textContent =
    `${format(n)} features · ${format(meta.images_seen)} images` +
    (meta.ms ? ` · MS over ${meta.ms}` : "");
  const headRow = document.querySelector("#features thead tr");
  for (const [name, label] of shown) {
    const th = document.createElement("th");
    th.dataset.col = name;
    th.textContent = label;
    th.addEventListener("click", () => {
      state.dir = state.sort === name ? -state.dir : name === "feature" ? 1 : -1;
      state.sort = name;
      state.page = 0;
      sort();
      render();
    });
    headRow.append(th);
  }
  for (const button of document.querySelectorAll("#pager button")) {
    button.addEventListener("click", () => {
      const go = { first: 0, prev: state.page - 1, next: state.page + 1, last: pages - 1 };
      state.page = Math.min(Math.max(go[button.dataset.go], 0), pages - 1);
      render();
    });
  }

  function sort() {
    const col = columns[state.sort];
    const dir = state.dir;
    for (let i = 0; i < n; i++) order[i] = i;
    // Features without a value (NaN: no Moran's I or MS) go last in either direction, then by id.
    order.sort((a, b) => {
      const x = col[a], y = col[b];
      const missing = Number.isNaN(x) - Number.isNaN(y);
      if (missing) return missing;
      return (Number.isNaN(x) ? 0 : (x - y) * dir) || a - b;
    });
  }

  function render() {
    for (const th of headRow.children) {
      th.classList.toggle("sorted", th.dataset.col === state.sort);
      th.dataset.dir = state.dir;
    }
    const rows = [];
    const end = Math.min((state.page + 1) * PAGE_ROWS, n);
    for (let i = state.page * PAGE_ROWS; i < end; i++) {
      const f = order[i];
      const cells = shown.slice(1).map(([name]) => `<td data-col="${name}">${cell(name, f)}</td>`);
      rows.push(`<tr><td><a href="${featureUrl(f)}">${f}</a></td>${cells.join("")}</tr>`);
    }
    document.querySelector("#features tbody").innerHTML = rows.join("");
    document.getElementById("page").textContent =
      `rows ${format(state.page * PAGE_ROWS + 1)}–${format(end)} of ${format(n)}`;
    history.replaceState(null, "", `#sort=${state.sort}&dir=${state.dir}&page=${state.page}`);
  }

  setUpJump(n);
  setUpSearch();
  sort();
  render();
}

function showFeature() {
  const { meta, features } = VS.index;
  const n = meta.n_features;
  const f = Number(new URLSearchParams(location.search).get("f"));
  setUpJump(n);
  const message = document.getElementById("message");
  if (!Number.isInteger(f) || f < 0 || f >= n) {
    message.textContent = `no feature ${new URLSearchParams(location.search).get("f")}`;
    return;
  }
  document.title = `feature ${f}: ${meta.sae}`;
  document.getElementById("title").textContent = `feature ${f} · ${meta.sae} · layer ${meta.layer}`;
  for (const [id, other] of [["prev", f - 1], ["next", f + 1]]) {
    if (other >= 0 && other < n) document.getElementById(id).href = featureUrl(other);
  }
  const stats = shownColumns(features).slice(1).map(
    ([name, label]) => `<tr><th>${label}</th><td data-col="${name}">${format(features[name][f])}</td></tr>`,
  );
  document.querySelector("#stats tbody").innerHTML = stats.join("");
  showLabels(f);
  document.getElementById("overlay").addEventListener("change", (event) => {
    document.body.classList.toggle("no-overlay", !event.target.checked);
  });

  const number = Math.floor(f / meta.block);
  const script = document.createElement("script");
  script.src = `data/block_${String(number).padStart(5, "0")}.js`;
  script.onload = () => showTopImages(meta, VS.blocks[number], f - number * meta.block);
  script.onerror = () => (message.textContent = `cannot load ${script.src}`);
  document.head.append(script);
}

/* The feature's best labels with their cosines, and what named them (or why nothing did). */
function showLabels(f) {
  const section = document.getElementById("labels");
  if (!named()) {
    section.textContent = `no labels: ${VS.labels ? VS.labels.missing : "no data/labels.js"}`;
    return;
  }
  const best = bestLabels(f);
  const list = document.createElement("ol");
  for (const pair of best) {
    const item = document.createElement("li");
    item.textContent = labelText(pair);
    list.append(item);
  }
  const about = document.createElement("p");
  about.className = VS.labels.random ? "about warning" : "about";
  about.textContent = best.length
    ? `labels: ${VS.labels.about}`
    : "no labels: this feature is the same on every image";
  section.replaceChildren(about, list);
}

function showTopImages(meta, block, i) {
  const top = block.top[i];
  const message = document.getElementById("message");
  if (top.length === 0) {
    message.textContent = "this feature fired on no image";
    return;
  }
  const scale = block.scale[i];
  const [rows, cols] = meta.grid || [0, 0];
  message.textContent = meta.grid
    ? `heatmap: ${rows}×${cols} patches, 0 to ${format(scale)} (this feature's largest)` +
      (meta.prefix.length ? `; beside it ${meta.prefix.join(", ")}` : "")
    : "";
  const cells = rows * cols;
  const levels = Uint8Array.from(atob(block.heat[i]), (c) => c.charCodeAt(0));
  const grid = document.getElementById("grid");
  grid.style.gridTemplateColumns = `repeat(${Math.ceil(Math.sqrt(meta.top_n))}, auto)`;
  top.forEach(([row, peak, prefix], rank) => {
    const figure = document.createElement("figure");
    const tile = document.createElement("div");
    tile.className = "tile";
    const img = document.createElement("img");
    img.src = `images/${row}.jpg`;
    img.alt = `row ${row}`;
    tile.append(img);
    if (cells) tile.append(heatCanvas(rows, cols, levels.subarray(rank * cells, (rank + 1) * cells)));
    const caption = document.createElement("figcaption");
    const values = document.createElement("div");
    values.className = "values";
    values.textContent = `#${rank + 1} · peak ${format(peak)} · row ${row}`;
    const text = document.createElement("div");
    text.className = "caption";
    text.textContent = block.captions[row] || "";
    caption.append(values, text);
    figure.append(tile, prefixCells(meta.prefix, prefix, scale), caption);
    grid.append(figure);
  });
}

/* The heatmap's colour of a level 0..255: yellow-red, alpha by level. */
function heatColour(level) {
  return [255, Math.round(level * 0.85), 0, Math.round(level * 0.75)];
}

/* One patch per canvas pixel, rows x cols (the CSS stretches it over the image). */
function heatCanvas(rows, cols, levels) {
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  levels.forEach((level, p) => pixels.data.set(heatColour(level), p * 4));
  context.putImageData(pixels, 0, 0);
  return canvas;
}

/* The tokens before the patch grid (CLS, registers), each a labelled cell in the heatmap's
   colours on the same scale (the patches' largest value; beyond it, full). */
function prefixCells(names, values, scale) {
  const strip = document.createElement("div");
  strip.className = "prefix";
  names.forEach((name, q) => {
    const share = scale > 0 ? values[q] / scale : Number(values[q] > 0);
    const level = Math.round(255 * Math.min(1, Math.max(0, share)));
    const [r, g, b, a] = heatColour(level);
    const cell = document.createElement("span");
    cell.className = "token";
    cell.dataset.token = name;
    cell.style.background = `rgba(${r}, ${g}, ${b}, ${a / 255})`;
    cell.textContent = `${name} ${format(values[q])}`;
    strip.append(cell);
  });
  return strip;
}

function showLayers() {
  /* Links to the same cache's other layers, written by `vitscope compare`. */
  const nav = document.getElementById("layers");
  for (const { layer, href, here } of VS.layers) {
    const link = document.createElement(here ? "strong" : "a");
    link.textContent = `layer ${layer}`;
    if (!here) link.href = href;
    nav.append(link, " ");
  }
}

function showGames() {
  /* The run's sort-eval game pages (data/games.js: written by browse, rewritten by sorteval). */
  const nav = document.getElementById("games");
  for (const { name, href } of VS.games || []) {
    const link = document.createElement("a");
    link.textContent = `sort-eval game (${name})`;
    link.href = href;
    nav.append(link, " ");
  }
}

window.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page !== "index") {
    showFeature();
    return;
  }
  showIndex();
  showLayers();
  showGames();
});
