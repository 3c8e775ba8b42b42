// handlens viewer: plain JS, no build step, no network beyond this service's own /api/v1.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
const state = { images: [], index: 0, models: [], detectors: [], zoom: 1, panX: 0, panY: 0, offset: 0, page: [], predicting: false, browsing: 0 };

async function api(path, options) {
  const response = await fetch(API + path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.json();
}

function status(text) { $("status").textContent = text; }

function fill(select, values, labels) {
  const keep = select.value;
  select.innerHTML = "";
  values.forEach((value, i) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = labels ? labels[i] : value;
    select.appendChild(option);
  });
  if (values.includes(keep)) select.value = keep;
}

function currentModel() { return state.models.find((m) => m.id === $("model").value); }
function currentDetector() { return state.detectors.find((d) => d.id === $("detector").value); }
function currentImage() { return state.images[state.index]; }

// ------------------------------------------------------------------ selectors

async function loadSelectors() {
  const [datasets, models, explainers] = await Promise.all([api("/datasets"), api("/models"), api("/explainers")]);
  // detectors find boxes: never a choice where a classifier is needed (model, compare, runs, browse)
  state.models = models.filter((m) => m.kind !== "detector");
  state.detectors = models.filter((m) => m.kind === "detector" && !m.damaged);
  state.explainers = explainers;
  fillDetectors();
  fill($("dataset"), datasets.map((d) => d.name));
  fill($("method"), explainers.map((e) => e.name));
  if (explainers.some((e) => e.name === "gradcam")) $("method").value = "gradcam";
  await loadLabelsets();
}

async function loadLabelsets() {
  const dataset = $("dataset").value;
  if (!dataset) return;
  const labelsets = await api(`/datasets/${encodeURIComponent(dataset)}/labelsets`);
  fill($("labelset"), labelsets.map((l) => l.name));
  fillModels();
  await loadImages();
}

function fillModels() {
  const models = state.models.filter((m) => m.dataset === $("dataset").value && m.labelset === $("labelset").value);
  // the run's name (its --name, else what differs from the others), then what it is
  const label = (m) => `${m.name || m.id} · ${m.backbone} ${m.frozen ? "frozen" : "fine-tuned"}` +
    (m.metrics.test ? ` · F1 ${m.metrics.test.macro_f1.toFixed(2)}` : "") + (m.name && m.name !== m.id ? ` · ${m.id}` : "");
  for (const select of [$("model"), $("cmp-a"), $("cmp-b")]) fill(select, models.map((m) => m.id), models.map(label));
  fill($("cmp-ma"), [...$("method").options].map((o) => o.value));
  fill($("cmp-mb"), [...$("method").options].map((o) => o.value));
  if (models.length > 1) $("cmp-b").value = models[1].id;
  $("cmp-ma").value = $("cmp-mb").value = $("method").value;
  fillModelDetails();
}

function fillModelDetails() {
  const model = currentModel();
  if (!model) return;
  fill($("layer"), model.layers.filter(Boolean));
  fill($("target"), ["pred", ...model.classes], ["predicted class", ...model.classes]);
  fill($("f-class"), ["", ...model.classes], ["all", ...model.classes]);
  fill($("f-pred"), ["", ...model.classes], ["any", ...model.classes]);
  state.offset = 0;
  loadConfusion().catch((error) => status(error.message));
  renderLosses().catch(() => {});
}

function fillDetectors() {
  const metric = (d) => d.metrics.val && typeof d.metrics.val.map_50 === "number" ?
    ` · mAP@0.5 ${d.metrics.val.map_50.toFixed(2)}` : "";
  const detectors = state.detectors;
  fill($("detector"), ["", ...detectors.map((d) => d.id)],
    ["none", ...detectors.map((d) => `${d.name || d.id} · ${d.dataset}${metric(d)}`)]);
  $("detector").disabled = !detectors.length;
  const classifiers = state.models.filter((m) => !m.damaged);  // a box's crop may be of another dataset's kind
  fill($("box-classifier"), ["", ...classifiers.map((m) => m.id)],
    ["none: boxes only", ...classifiers.map((m) => `${m.name || m.id} · ${m.dataset}/${m.labelset}`)]);
  setDetectMode();
}

function setDetectMode() {
  // with a detector, Inspect and Upload find boxes; the method explains the box classifier's label in each box
  const on = Boolean(currentDetector());
  document.querySelectorAll(".detect-only").forEach((e) => { e.hidden = !on; });
  $("target").disabled = on;
  $("target").title = on ? "each box is explained for its own label" : "";
  if (on) {
    $("layer").disabled = true;
    $("method").disabled = !$("box-classifier").value;
    $("method").title = $("method").disabled ? "a method explains a classifier's label: pick a box classifier" : "";
  } else {
    $("method").disabled = false;
    $("method").title = "";
  }
}

function refresh() { return currentDetector() ? detectCurrent() : explainCurrent(); }

async function loadImages() {
  const params = new URLSearchParams({ dataset: $("dataset").value, labelset: $("labelset").value, limit: 1000 });
  const model = currentModel();
  if (model && model.split) params.set("split", model.split);  // each image then carries its subset
  const listing = await api(`/images?${params}`);
  state.images = listing.items;
  state.index = 0;
  status(`${listing.total} images${listing.split ? " in split " + listing.split : ""}`);
  await showImage();
  state.offset = 0;
  await browse();
}

// ------------------------------------------------------------------ inspect

function clearAnswer() {
  // never the previous image's overlay, prediction and bars beside this image's name
  $("heat").removeAttribute("src");
  $("predicted").textContent = "-";
  $("probs").innerHTML = "";
  $("explain-info").textContent = "";
  $("trust-badge").className = "badge trust";
  $("trust-badge").textContent = "";
  $("shortcuts").className = "shortcuts small";
  $("shortcuts").textContent = "";
  $("right-wrong").textContent = "";
  $("legend").innerHTML = "";
  $("unseen-note").textContent = "";
  $("box-maps").innerHTML = "";
  $("box-outlines").innerHTML = "";
  $("box-list").innerHTML = "";
}

function showVerdictMark(predicted, truth) {
  // right or wrong, beside the prediction (no mark when the truth is unknown)
  const mark = $("right-wrong");
  const known = truth && truth !== "-";
  mark.className = `mark ${known ? (predicted === truth ? "right" : "wrong") : ""}`;
  mark.textContent = known ? (predicted === truth ? "✓ right" : "✗ wrong") : "";
}

function showLegend(result) {
  // what the colours mean: for a signed map, which colour is for the class and which against
  const legend = $("legend");
  if (result.signed) {
    legend.className = "legend signed";
    legend.innerHTML = "<span class='for'></span> for <b></b> · <span class='against'></span> against";
  } else {
    legend.className = "legend ramp";
    legend.innerHTML = "<span class='scale'></span> low → high evidence for <b></b>";
  }
  legend.querySelector("b").textContent = result.target;
  const unseen = result.shortcuts && result.shortcuts.unseen > 0;
  $("unseen-note").textContent = unseen ? `hatched: ${(result.shortcuts.unseen * 100).toFixed(0)}% of the ` +
    "image the model never saw (outside its centre crop), not a cold map" : "";
}

function showShortcuts(shortcuts) {
  // where the map's energy sits (outside the specimen, on padding, in the border band): the words of the API
  const line = $("shortcuts");
  line.className = `shortcuts small ${shortcuts ? shortcuts.verdict.replaceAll(" ", "-") : ""}`;
  line.textContent = shortcuts ? shortcuts.sentence : "";
}

async function showImage() {
  const image = currentImage();
  if (!image) return;
  state.asked = "";  // any answer still on its way is for another image now
  clearAnswer();
  const detail = await api(`/images/${image.id}`);
  if (currentImage() !== image) return;  // moved on while this detail was on its way: it is not this image's
  $("image-name").textContent = detail.name;
  $("truth").textContent = detail.labels[$("labelset").value] || "-";
  const model = currentModel();
  const own = detail.splits.find((x) => model && x.split === model.split && x.fold === 0);
  const split = own ? own.subset : (image.subset || "");
  $("split-badge").textContent = split;
  $("split-badge").className = `badge ${split}`;
  $("base").src = `${API}/images/${image.id}/file`;
  drawRegions(detail);
  await refresh();
}

function drawRegions(detail) {
  const svg = $("regions");
  svg.innerHTML = "";
  svg.setAttribute("viewBox", `0 0 ${detail.width} ${detail.height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  for (const region of detail.regions) {
    if (region.has_mask) {  // a mask region: drawn from its picture, tinted on the server
      const picture = document.createElementNS("http://www.w3.org/2000/svg", "image");
      picture.setAttribute("href", `${API}/regions/${region.id}/mask.png`);
      picture.setAttribute("width", detail.width);
      picture.setAttribute("height", detail.height);
      picture.setAttribute("preserveAspectRatio", "none");
      svg.appendChild(picture);
    }
    for (const polygon of region.polygons || []) {
      const shape = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
      shape.setAttribute("points", polygon.map((p) => p.join(",")).join(" "));
      svg.appendChild(shape);
    }
  }
}

function methodUsesLayer(method) {
  const spec = (state.explainers || []).find((e) => e.name === method);
  return spec ? spec.uses_layer : true;
}

async function explainImage(modelId, imageId, method, layer, target) {
  const body = { image_id: imageId, method, target: target || "pred" };
  if (layer) body.layer = layer;
  return api(`/models/${encodeURIComponent(modelId)}/explain`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

async function explainCurrent() {
  const model = currentModel();
  const image = currentImage();
  if (!model || !image) return;
  status("explaining...");
  $("trust-badge").className = "badge trust";
  $("trust-badge").textContent = "";  // never the previous map's verdict
  const method = $("method").value;
  const usesLayer = methodUsesLayer(method);
  $("layer").disabled = !usesLayer;  // a pixel method has no layer: greyed out, never silently ignored
  $("layer").title = usesLayer ? "" : `${method} attributes pixels: it uses no layer`;
  const asked = [model.id, image.id, method, usesLayer ? $("layer").value : null, $("target").value];
  state.asked = asked.join("|");
  try {
    const result = await explainImage(...asked);
    if (state.asked !== asked.join("|")) return;  // the user moved on: a newer request owns the view
    $("heat").src = `data:image/png;base64,${result.overlay_png}`;
    $("heat").dataset.target = result.target;
    renderBars($("probs"), result.probabilities);
    showShortcuts(result.shortcuts);
    const top = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1])[0];
    $("predicted").textContent = `${top[0]} (${(top[1] * 100).toFixed(1)}%)`;
    showVerdictMark(top[0], $("truth").textContent);
    showLegend(result);
    $("explain-info").textContent = `${result.method}${result.layer ? " on " + result.layer : ""} for ` +
      `${result.target}${result.cached ? " (cached)" : ""} · ${result.seconds}s`;
    status("ready");
    trustCurrent(asked);  // after the overlay is shown: the overlay never waits for the badge
  } catch (error) {
    if (state.asked === asked.join("|")) clearAnswer();  // a failed answer leaves nothing stale
    status(error.message);
  }
}

// ------------------------------------------------------------------ detect

// the outline colours of the boxes' labels (as handlens.detect.render draws them); boxes without a label: white
const PALETTE = ["#ffd700", "#00c8ff", "#ff50a0", "#78ff78", "#ff8c00", "#b478ff"];

function detectQuery(extra) {
  // the detection's options travel as query parameters; the body is the image alone
  const params = new URLSearchParams(extra || {});
  const classifier = $("box-classifier").value;
  if (classifier) {
    params.set("classifier", classifier);
    if ($("method").value) params.set("method", $("method").value);
  }
  const score = $("box-score").value.trim();
  if (score !== "") params.set("score", score);
  return params;
}

async function detectCurrent() {
  const detector = currentDetector();
  const image = currentImage();
  if (!detector || !image) return;
  setDetectMode();
  status("detecting...");
  const query = detectQuery();
  const asked = ["detect", detector.id, image.id, query.toString()].join("|");
  state.asked = asked;
  try {
    const result = await api(`/models/${encodeURIComponent(detector.id)}/detect?${query}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image_id: image.id }),
    });
    if (state.asked !== asked) return;  // the user moved on: a newer request owns the view
    $("heat").removeAttribute("src");
    $("probs").innerHTML = "";
    drawBoxes(result);
    showBoxList($("box-list"), result);
    $("predicted").textContent = `${result.count} box${result.count === 1 ? "" : "es"}`;
    $("right-wrong").textContent = "";
    if (result.method) showLegend({ signed: result.signed, target: "each box's label" });
    $("explain-info").textContent = `${detector.name || detector.id}: ${result.tiles} tile(s), score ≥ ` +
      `${result.score_threshold.toFixed(2)}` + (result.classifier ? ` · labelled by ${result.classifier}` : "") +
      (result.method ? ` · ${result.method} in ${result.explained} of ${result.count} boxes` : "") +
      `${result.cached ? " (cached)" : ""} · ${result.seconds}s`;
    status("ready");
  } catch (error) {
    if (state.asked === asked) clearAnswer();
    status(error.message);
  }
}

function svgElement(name, attributes) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

function drawBoxes(result) {
  // in the image's pixels, over the image as it is shown: each box's map inside its crop, then the outlines
  const [width, height] = result.size;
  const svg = $("boxes");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  const maps = $("box-maps");
  const outlines = $("box-outlines");
  maps.innerHTML = "";
  outlines.innerHTML = "";
  const font = Math.max(10, Math.round(Math.max(width, height) / 45));
  const classes = [...new Set(result.boxes.map((b) => b.label).filter(Boolean))].sort();
  result.boxes.forEach((box, index) => {
    if (box.map_png) {
      const [cx0, cy0, cx1, cy1] = box.crop;
      maps.appendChild(svgElement("image", { href: `data:image/png;base64,${box.map_png}`, x: cx0, y: cy0,
        width: cx1 - cx0, height: cy1 - cy0, preserveAspectRatio: "none" }));
    }
    const [x0, y0, x1, y1] = box.box;
    const colour = box.label ? PALETTE[classes.indexOf(box.label) % PALETTE.length] : "#ffffff";
    const rect = svgElement("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colour,
      "data-index": index, "data-label": box.label || box.detected });
    outlines.appendChild(rect);
    const text = svgElement("text", { x: x0, y: Math.max(font, y0 - 3), fill: colour, "font-size": font });
    text.textContent = `${box.label || box.detected} ${box.score.toFixed(2)}`;
    outlines.appendChild(text);
  });
  applyView();
}

function showBoxList(list, result) {
  list.innerHTML = "";
  for (const box of result.boxes) {
    const item = document.createElement("li");
    const sure = box.probabilities ? ` (${(box.probabilities[box.label] * 100).toFixed(0)}%)` : "";
    item.textContent = `${box.label || box.detected}${sure} · score ${box.score.toFixed(2)}` +
      (result.method && !box.explained ? " · not explained (over the service's limit)" : "");
    list.appendChild(item);
  }
  if (!result.boxes.length) list.innerHTML = "<li>no box above the score threshold</li>";
}

async function trustCurrent(asked) {
  const badge = $("trust-badge");
  const [modelId, imageId, method, layer, target] = asked;
  badge.className = "badge trust pending";
  badge.textContent = "checking the map against a random one...";
  const body = { image_id: imageId, method, target: target || "pred" };
  if (layer) body.layer = layer;
  try {
    const result = await api(`/models/${encodeURIComponent(modelId)}/trust`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (state.asked !== asked.join("|")) return;  // moved on: this badge belongs to another map
    badge.className = `badge trust ${result.verdict.replaceAll(" ", "-")}`;
    badge.textContent = result.sentence;
  } catch (error) {
    if (state.asked !== asked.join("|")) return;
    badge.className = "badge trust";
    badge.textContent = `no trust verdict: ${error.message}`;
  }
}

function renderBars(container, probabilities) {
  container.innerHTML = "";
  const best = Math.max(...Object.values(probabilities));
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "bar" + (p === best ? " top" : "");
    row.dataset.class = name;
    row.innerHTML = `<span></span><div class="fill"></div><span>${(p * 100).toFixed(1)}%</span>`;
    row.firstChild.textContent = name;
    row.children[1].style.width = `${Math.max(1, p * 100)}%`;
    container.appendChild(row);
  }
}

function applyView() {
  $("heat").style.opacity = $("show-map").checked ? $("opacity").value : 0;
  $("box-maps").style.opacity = $("show-map").checked ? $("opacity").value : 0;  // the per-box maps alike
  $("layers").style.transform = `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
}

function step(delta) {
  if (!state.images.length) return;
  state.index = (state.index + delta + state.images.length) % state.images.length;
  showImage();
}

function setupStage() {
  const stage = $("stage");
  stage.addEventListener("wheel", (event) => {
    event.preventDefault();
    const factor = event.deltaY < 0 ? 1.2 : 1 / 1.2;
    const rect = stage.getBoundingClientRect();
    const x = event.clientX - rect.left, y = event.clientY - rect.top;
    const zoom = Math.min(16, Math.max(1, state.zoom * factor));
    state.panX = x - (x - state.panX) * (zoom / state.zoom);
    state.panY = y - (y - state.panY) * (zoom / state.zoom);
    state.zoom = zoom;
    applyView();
  }, { passive: false });
  let drag = null;
  stage.addEventListener("mousedown", (e) => { drag = { x: e.clientX - state.panX, y: e.clientY - state.panY }; });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    state.panX = e.clientX - drag.x;
    state.panY = e.clientY - drag.y;
    applyView();
  });
  $("reset-zoom").onclick = () => { state.zoom = 1; state.panX = state.panY = 0; applyView(); };
  $("opacity").oninput = applyView;
  $("show-map").onchange = applyView;
  $("prev").onclick = () => step(-1);
  $("next").onclick = () => step(1);
  document.addEventListener("keydown", (event) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
    if (event.key === "ArrowRight" || event.key === "j") step(1);
    if (event.key === "ArrowLeft" || event.key === "k") step(-1);
    if (event.key === "m") { $("show-map").checked = !$("show-map").checked; applyView(); }
  });
}

// ------------------------------------------------------------------ browse

function browseParams(extra) {
  // every filter is applied on the server, over all the images: counts are never of a sample
  const params = new URLSearchParams({ labelset: $("labelset").value, limit: 100, offset: state.offset });
  const set = (key, value) => { if (value) params.set(key, value); };
  set("label", $("f-class").value);
  set("subset", $("f-split").value);
  set("result", $("f-result").value);
  set("predicted", $("f-pred").value);
  set("q", $("f-name").value.trim());
  const confidence = parseFloat($("f-conf").value) || 0;
  if (confidence > 0) params.set("min_confidence", confidence);
  for (const [key, value] of Object.entries(extra || {})) params.set(key, value);
  return params;
}

async function browse() {
  const model = currentModel();
  if (!model) return;
  // answers can come back out of order (a page asked for before a filter changed, while the server scores):
  // only the latest request's answer is shown, so a slow earlier one never overwrites a newer filter's page
  const asked = ++state.browsing;
  const page = await api(`/models/${encodeURIComponent(model.id)}/browse?${browseParams()}`);
  if (asked !== state.browsing) return;
  state.page = page.items;
  $("covers").textContent = page.covers;
  $("page-prev").disabled = state.offset === 0;
  $("page-next").disabled = state.offset + page.items.length >= page.total;
  showPredictionState(page.predictions);
  renderGrid(page.items);
  if (["none", "stale"].includes(page.predictions.state)) startPredictions();
}

function showPredictionState(p) {
  const words = { none: "predictions: not computed yet", ready: `predictions: stored for ${p.of} images`,
    stale: `predictions: ${p.of} images added since they were stored, scoring them`,
    computing: `predictions: computing (${p.done} of ${p.of} images)`, failed: `predictions failed: ${p.error}` };
  $("pred-state").textContent = words[p.state] + (p.skipped ? ` · ${p.skipped} file(s) gone or changed since ` +
    `import were skipped (e.g. ${p.skipped_examples[0]})` : "");
}

async function startPredictions() {
  const model = currentModel();
  if (!model || state.predicting) return;
  state.predicting = true;
  try {
    let answer = await api(`/models/${encodeURIComponent(model.id)}/predictions`, { method: "POST" });
    while (answer.state === "computing" && currentModel() === model) {
      showPredictionState(answer);
      await new Promise((resolve) => setTimeout(resolve, 700));
      answer = await api(`/models/${encodeURIComponent(model.id)}/predictions`, { method: "POST" });
    }
    showPredictionState(answer);
  } finally {
    state.predicting = false;
  }
  await Promise.all([browse(), loadConfusion(), renderLosses()]);
}

function openImage(items, index) {
  state.images = items;
  state.index = index;
  switchPage("inspect");
  showImage();
}

function renderGrid(items) {
  const grid = $("grid");
  grid.innerHTML = "";
  items.forEach((image, index) => {
    const figure = document.createElement("figure");
    if (image.correct !== null) figure.className = image.correct ? "right" : "wrong";
    figure.innerHTML = `<img loading="lazy" alt=""><figcaption></figcaption>`;
    figure.firstChild.src = `${API}/images/${image.id}/thumbnail?size=128`;
    const mark = image.correct === null ? "" : (image.correct ? " ✓" : " ✗");
    figure.lastChild.textContent = `${image.label}${image.predicted ? " → " + image.predicted : ""}${mark}`;
    figure.title = image.name;
    figure.onclick = () => openImage(items, index);
    grid.appendChild(figure);
  });
}

async function loadConfusion() {
  const model = currentModel();
  const table = $("confusion");
  table.innerHTML = "";
  if (!model) return;
  // counted from the stored predictions of every test image: a cell shows exactly the images it counts
  const page = await api(`/models/${encodeURIComponent(model.id)}/browse?` +
    new URLSearchParams({ labelset: $("labelset").value, subset: "test", limit: 1 }));
  const matrix = page.confusion;
  $("confusion-note").textContent = matrix ? `${page.total} test images` : "waiting for predictions";
  if (!matrix) return;
  const header = document.createElement("tr");
  for (const text of ["truth \\ predicted", ...page.classes]) {
    const th = document.createElement("th");
    th.textContent = text;
    header.appendChild(th);
  }
  table.appendChild(header);
  const max = Math.max(1, ...matrix.flat());
  matrix.forEach((row, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = page.classes[i];
    tr.appendChild(th);
    row.forEach((count, j) => {
      const td = document.createElement("td");
      td.textContent = count;
      td.style.background = `rgba(214, 102, 51, ${count / max})`;
      td.onclick = () => {
        $("f-class").value = page.classes[i];
        $("f-pred").value = page.classes[j];
        $("f-split").value = "test";
        $("f-result").value = "";
        state.offset = 0;
        browse();
      };
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
}

async function renderLosses() {
  const model = currentModel();
  const list = $("losses");
  list.innerHTML = "";
  if (!model) return;
  const page = await api(`/models/${encodeURIComponent(model.id)}/browse?` +
    new URLSearchParams({ labelset: $("labelset").value, subset: "test", sort: "loss", limit: 10 }));
  page.items.filter((image) => image.loss !== null).forEach((image, index) => {
    const item = document.createElement("li");
    item.textContent = `${image.name} (${image.label} → ${image.predicted}, loss ${image.loss.toFixed(2)})`;
    item.onclick = () => openImage(page.items, index);
    list.appendChild(item);
  });
}

// ------------------------------------------------------------------ upload and compare

async function uploadFile(file) {
  const model = currentModel();
  const detector = currentDetector();
  if ((!model && !detector) || !file) return;
  $("upload-error").textContent = "";
  // never the previous upload's answer beside this file's name
  $("upload-overlay").removeAttribute("src");
  $("upload-probs").innerHTML = "";
  $("upload-pred").textContent = "-";
  $("upload-name").textContent = file.name;
  $("upload-boxes").innerHTML = "";
  const form = new FormData();
  form.append("file", file);
  if (detector) return detectUpload(detector, form);
  form.append("method", $("method").value);
  try {
    const result = await api(`/models/${encodeURIComponent(model.id)}/explain`, { method: "POST", body: form });
    $("upload-overlay").src = `data:image/png;base64,${result.overlay_png}`;
    renderBars($("upload-probs"), result.probabilities);
    const top = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1])[0];
    $("upload-pred").textContent = `${top[0]} (${(top[1] * 100).toFixed(1)}%) · ${result.method} for ${result.target}`;
  } catch (error) {
    $("upload-error").textContent = error.message;
  }
}

async function detectUpload(detector, form) {
  // the service draws the boxes, labels and maps into the overlay for an upload (it is not in the catalog)
  try {
    const result = await api(`/models/${encodeURIComponent(detector.id)}/detect?${detectQuery({ overlay: "true" })}`,
      { method: "POST", body: form });
    $("upload-overlay").src = `data:image/png;base64,${result.overlay_png}`;
    $("upload-pred").textContent = `${result.count} box${result.count === 1 ? "" : "es"} · ${detector.name || detector.id}` +
      (result.method ? ` · ${result.method} in each box` : "");
    showBoxList($("upload-boxes"), result);
  } catch (error) {
    $("upload-error").textContent = error.message;
  }
}

async function compare() {
  const image = currentImage();
  if (!image) return;
  const sides = [["cmp-a", "cmp-ma", "cmp-left"], ["cmp-b", "cmp-mb", "cmp-right"]];
  await Promise.all(sides.map(async ([modelSelect, methodSelect, target]) => {
    const model = state.models.find((m) => m.id === $(modelSelect).value);
    try {
      $(target).removeAttribute("src");
      const result = await explainImage(model.id, image.id, $(methodSelect).value, null, "pred");
      $(target).src = `data:image/png;base64,${result.overlay_png}`;
      const top = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1])[0];
      const truth = image.label || "-";
      $(`${target}-cap`).textContent = `${model.name || model.id} · ${result.method} · ${image.name || ""} · ` +
        `predicts ${top[0]} (${(top[1] * 100).toFixed(1)}%) · truth ${truth}${top[0] === truth ? " ✓" : truth === "-" ? "" : " ✗"}`;
    } catch (error) {
      $(`${target}-cap`).textContent = error.message;
    }
  }));
}

function switchPage(name) {
  document.querySelectorAll("header nav button").forEach((b) => b.classList.toggle("active", b.dataset.page === name));
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== `page-${name}`; });
}

function setup() {
  // runs.js is loaded after this file: wait for it before wiring the runs page
  if (typeof setupRuns !== "function" || typeof setupJobs !== "function") {
    window.addEventListener("DOMContentLoaded", setup, { once: true });
    return;
  }
  document.querySelectorAll("header nav button").forEach((b) => { b.onclick = () => switchPage(b.dataset.page); });
  $("dataset").onchange = loadLabelsets;
  $("labelset").onchange = () => { fillModels(); loadImages(); };
  $("model").onchange = () => { fillModelDetails(); loadImages(); };
  for (const id of ["method", "layer", "target"]) $(id).onchange = refresh;
  for (const id of ["detector", "box-classifier", "box-score"]) {
    $(id).onchange = () => { setDetectMode(); clearAnswer(); refresh(); };
  }
  for (const id of ["f-class", "f-split", "f-result", "f-pred", "f-conf", "f-name"]) {
    $(id).onchange = () => { state.offset = 0; browse(); };
  }
  $("page-prev").onclick = () => { state.offset = Math.max(0, state.offset - 100); browse(); };
  $("page-next").onclick = () => { state.offset += 100; browse(); };
  $("cmp-go").onclick = compare;
  $("file").onchange = (e) => uploadFile(e.target.files[0]);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); uploadFile(e.dataTransfer.files[0]); });
  setupStage();
  applyView();
  setupRuns();  // runs.js
  setupJobs();  // jobs.js
  loadSelectors().catch((error) => status(error.message));
}

setup();
