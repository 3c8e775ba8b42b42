// handlens viewer, runs page: every run and study of the dataset and labelset, a study's parallel coordinates
// and parameter importances, and the same image's map from 2 to 6 picked runs side by side.
// Uses viewer.js's api(), $(), state, currentImage(), explainImage(). No network beyond /api/v1.
"use strict";

const runs = { rows: [], sortKey: "started_at", descending: true, picked: new Set() };
const RUN_COLUMNS = [
  ["name", "name"], ["backbone", "backbone"], ["freeze", "freeze"], ["pool", "pool"], ["size", "size"],
  ["epochs", "epochs"], ["cv_mean", "CV macro-F1"], ["val_macro_f1", "val F1"], ["test_macro_f1", "test F1"],
  ["seconds", "time (s)"],
];

async function loadRuns() {
  const params = new URLSearchParams({ dataset: $("dataset").value, labelset: $("labelset").value });
  runs.rows = await api(`/runs?${params}`);
  for (const id of [...runs.picked]) if (!runs.rows.some((r) => r.id === id)) runs.picked.delete(id);
  renderRuns();
  const studies = await api(`/studies?${new URLSearchParams({ dataset: $("dataset").value })}`);
  fill($("study"), ["", ...studies.map((s) => s.name)],
    ["(choose a study)", ...studies.map((s) => `${s.name} · best CV ${s.best_cv_mean === null ? "-" : s.best_cv_mean.toFixed(3)}`)]);
}

function cellText(row, key) {
  const value = row[key];
  if (value === null || value === undefined) return "-";
  if (key === "cv_mean") return `${value.toFixed(3)} ± ${(row.cv_std || 0).toFixed(3)}`;
  if (key.endsWith("macro_f1")) return value.toFixed(3);  // JSON's 1.0 arrives as 1: scores keep 3 decimals
  if (key === "seconds") return value.toFixed(1);
  return String(value);
}

function renderRuns() {
  const table = $("runs-table");
  table.innerHTML = "";
  const head = document.createElement("tr");
  head.appendChild(document.createElement("th")).textContent = "pick";
  for (const [key, title] of RUN_COLUMNS) {
    const th = document.createElement("th");
    th.textContent = title + (runs.sortKey === key ? (runs.descending ? " ▼" : " ▲") : "");
    th.className = "sortable";
    th.dataset.key = key;
    th.onclick = () => {
      runs.descending = runs.sortKey === key ? !runs.descending : true;
      runs.sortKey = key;
      renderRuns();
    };
    head.appendChild(th);
  }
  table.appendChild(head);
  const sorted = [...runs.rows].sort((a, b) => {
    const x = a[runs.sortKey], y = b[runs.sortKey];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (runs.descending ? -1 : 1);
  });
  for (const row of sorted) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = runs.picked.has(row.id);
    box.onchange = () => {
      if (box.checked && runs.picked.size >= 6) { box.checked = false; return; }  // 2 to 6 side by side
      if (box.checked) runs.picked.add(row.id); else runs.picked.delete(row.id);
      $("runs-go").disabled = runs.picked.size < 2;
      $("runs-picked").textContent = `${runs.picked.size} picked (2 to 6)`;
    };
    tr.appendChild(document.createElement("td")).appendChild(box);
    for (const [key] of RUN_COLUMNS) tr.appendChild(document.createElement("td")).textContent = cellText(row, key);
    table.appendChild(tr);
  }
  $("runs-go").disabled = runs.picked.size < 2;
  $("runs-picked").textContent = `${runs.picked.size} picked (2 to 6)`;
}

async function compareRuns() {
  const image = currentImage();
  const box = $("runs-compare");
  box.innerHTML = "";
  if (!image) return;
  const method = $("method").value, target = $("target").value;
  await Promise.all([...runs.picked].map(async (id) => {
    const model = state.models.find((m) => m.id === id);
    const figure = document.createElement("figure");
    figure.dataset.id = id;
    figure.innerHTML = "<img alt=''><figcaption><b></b><br><span class='pred'></span><br>" +
      "<span class='badge trust pending'>checking the map against a random one...</span></figcaption>";
    box.appendChild(figure);
    const name = (runs.rows.find((r) => r.id === id) || {}).name || id;
    figure.querySelector("b").textContent = name;
    const classTarget = model && model.classes.includes(target) ? target : "pred";
    try {
      const result = await explainImage(id, image.id, method, null, classTarget);
      figure.querySelector("img").src = `data:image/png;base64,${result.overlay_png}`;
      const top = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1])[0];
      figure.querySelector(".pred").textContent = `${method} for ${result.target} · predicts ${top[0]} ` +
        `(${(top[1] * 100).toFixed(1)}%)`;
      const trust = await api(`/models/${encodeURIComponent(id)}/trust`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image_id: image.id, method, target: classTarget }),
      });
      const badge = figure.querySelector(".badge");
      badge.className = `badge trust ${trust.verdict.replaceAll(" ", "-")}`;
      badge.textContent = trust.sentence;
    } catch (error) {
      figure.querySelector(".pred").textContent = error.message;
      figure.querySelector(".badge").textContent = "";
    }
  }));
}

async function loadStudy() {
  const name = $("study").value;
  $("pcoords").innerHTML = "";
  $("importances").innerHTML = "";
  $("study-verdict").textContent = "";
  if (!name) return;
  const study = await api(`/studies/${encodeURIComponent(name)}`);
  $("study-verdict").textContent = study.verdict;
  drawParallel($("pcoords"), study);
  for (const [param, value] of Object.entries(study.importances).sort((a, b) => b[1] - a[1])) {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = "<span></span><div class='fill'></div><span></span>";
    row.children[0].textContent = param;
    row.children[1].style.width = `${Math.max(1, value * 100)}%`;
    row.children[2].textContent = value.toFixed(2);
    $("importances").appendChild(row);
  }
  if (!Object.keys(study.importances).length) $("importances").textContent = "importances need 3 complete trials";
}

function axisScale(values) {
  // numbers on a linear (or log, when they span 20x or more) axis; anything else evenly spaced by first use
  const numbers = values.filter((v) => typeof v === "number");
  if (numbers.length === values.length && numbers.length) {
    const low = Math.min(...numbers), high = Math.max(...numbers);
    const log = low > 0 && high / low >= 20;
    const f = (v) => (log ? Math.log(v) : v);
    return { at: (v) => (high === low ? 0.5 : (f(v) - f(low)) / (f(high) - f(low))), ticks: [low, high] };
  }
  const kinds = [...new Set(values.map(String))];
  return { at: (v) => (kinds.length === 1 ? 0.5 : kinds.indexOf(String(v)) / (kinds.length - 1)), ticks: kinds };
}

function drawParallel(svg, study) {
  const trials = study.trials.filter((t) => t.status === "complete" && t.cv_mean !== null);
  const keys = [...new Set(trials.flatMap((t) => Object.keys(t.params)))];
  const axes = [...keys, "CV macro-F1"];
  const width = 160 * axes.length, height = 260, top = 30, bottom = 230;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const value = (t, key) => (key === "CV macro-F1" ? t.cv_mean : t.params[key]);
  const scales = axes.map((key) => axisScale(trials.map((t) => value(t, key))));
  const x = (i) => 80 + i * 160;
  const y = (fraction) => bottom - fraction * (bottom - top);
  const cv = scales[scales.length - 1];
  const make = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    svg.appendChild(node);
    return node;
  };
  for (const t of trials) {
    const points = axes.map((key, i) => `${x(i)},${y(scales[i].at(value(t, key)))}`).join(" ");
    const hue = Math.round(120 * cv.at(t.cv_mean));  // red (worst) to green (best)
    const line = make("polyline", { points, fill: "none", stroke: `hsl(${hue}, 70%, 40%)`,
      "stroke-width": t.number === study.winner ? 4 : 1.5, "data-trial": t.number });
    line.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "title")).textContent =
      `trial ${t.number}: CV ${t.cv_mean.toFixed(3)} ± ${(t.cv_std || 0).toFixed(3)}`;
  }
  axes.forEach((key, i) => {
    make("line", { x1: x(i), x2: x(i), y1: top, y2: bottom, stroke: "#333" });
    make("text", { x: x(i), y: 16, "text-anchor": "middle", "font-size": 12 }).textContent = key;
    for (const tick of scales[i].ticks) {
      const label = typeof tick === "number" ? (Number.isInteger(tick) ? tick : tick.toPrecision(3)) : tick;
      make("text", { x: x(i) + 6, y: y(scales[i].at(tick)) + 4, "font-size": 10 }).textContent = label;
    }
  });
}

function setupRuns() {
  $("runs-go").onclick = compareRuns;
  $("study").onchange = loadStudy;
  document.querySelector("header nav button[data-page=runs]").addEventListener("click", () => {
    loadRuns().catch((error) => status(error.message));
  });
}
