// handlens viewer, jobs page: queue a training run or a study from a form, watch each job live (server-sent
// events), cancel it, and open a finished model in Inspect. Uses viewer.js's api(), $(), state, fill(),
// status(), switchPage(), loadSelectors(). No network beyond /api/v1.
"use strict";

const jobs = { rows: [], streams: new Map(), asked: 0 };
const POLICIES = ["auto", "none", "basic", "natural-photo", "xray", "thin-section", "microscopy"];
const ACTIVE = new Set(["queued", "running"]);

function jobConfig() {
  const dataset = $("dataset").value, labelset = $("labelset").value;
  if ($("job-kind").value === "study") {
    const trials = parseInt($("job-trials").value, 10);
    return { kind: "study", config: { dataset, labelset, preset: $("job-preset").value, ...(Number.isNaN(trials) ? {} : { trials }) } };
  }
  const epochs = parseInt($("job-epochs").value, 10);
  return {
    kind: "train",
    config: {
      data: { dataset, labelset },
      model: { backbone: $("job-backbone").value, weights: $("job-weights").value, freeze: $("job-freeze").value },
      train: Number.isNaN(epochs) ? {} : { epochs },
      augment: { policy: $("job-policy").value },
    },
  };
}

async function submitJob(event) {
  event.preventDefault();
  try {
    const job = await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify(jobConfig()) });
    $("job-message").textContent = `queued ${job.kind} job ${job.id}`;
    await loadJobs();
  } catch (error) {
    $("job-message").textContent = error.message;  // e.g. a bad setting, named by the service
  }
}

function progressText(job) {
  const p = job.progress || {};
  if (job.status === "failed" || job.status === "cancelled") return job.error || job.status;
  if (p.epochs) {
    const f1 = p.metrics && typeof p.metrics.val_macro_f1 === "number" ? ` · val F1 ${p.metrics.val_macro_f1.toFixed(3)}` : "";
    const eta = typeof p.eta_seconds === "number" && job.status === "running" ? ` · ETA ${Math.round(p.eta_seconds)} s` : "";
    return `epoch ${p.epoch}/${p.epochs}${f1}${eta}`;
  }
  return p.message || "";
}

function modelIdOf(job) {
  const bundle = job.result && job.result.bundle;
  if (!bundle) return null;
  const parts = bundle.split("/");
  return parts[parts.length - 2] || null;  // runs/<id>/bundle: the model's id is its run folder
}

function renderJobs() {
  const table = $("jobs-table");
  table.innerHTML = "";
  const head = table.insertRow();
  for (const title of ["job", "kind", "status", "progress", "attempts", "queued at", ""]) {
    head.appendChild(document.createElement("th")).textContent = title;
  }
  for (const job of jobs.rows) {
    const row = table.insertRow();
    row.dataset.job = job.id;
    for (const text of [job.id, job.kind, job.status, progressText(job), String(job.attempts), job.created_at]) {
      row.insertCell().textContent = text;
    }
    row.cells[2].className = `job-${job.status}`;
    const actions = row.insertCell();
    if (ACTIVE.has(job.status)) {
      const cancel = actions.appendChild(document.createElement("button"));
      cancel.textContent = "Cancel";
      cancel.onclick = () => cancelJob(job.id);
    } else if (job.status === "finished" && modelIdOf(job)) {
      const open = actions.appendChild(document.createElement("button"));
      open.textContent = "Open in Inspect";
      open.onclick = () => openInInspect(job);
    }
  }
}

async function cancelJob(id) {
  try { await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); } catch (error) { status(error.message); }
  await loadJobs();
}

async function openInInspect(job) {
  await loadSelectors();  // the new model is in the pool's list now
  const model = state.models.find((m) => m.id === modelIdOf(job));
  if (!model) { status(`model ${modelIdOf(job)} is not served (yet)`); return; }
  $("dataset").value = model.dataset;
  await loadLabelsets();
  $("labelset").value = model.labelset;
  fillModels();
  $("model").value = model.id;
  fillModelDetails();
  await loadImages();
  switchPage("inspect");
}

// a browser opens at most 6 connections to the service: a few streams for running jobs, the rest polled
const MAX_STREAMS = 3;

function watch(job) {
  if (jobs.streams.has(job.id) || !ACTIVE.has(job.status) || jobs.streams.size >= MAX_STREAMS) return;
  const source = new EventSource(`${API}/jobs/${encodeURIComponent(job.id)}/events`);
  jobs.streams.set(job.id, source);
  const update = (event) => {
    const data = JSON.parse(event.data);
    const row = jobs.rows.find((r) => r.id === job.id);
    if (!row) return;
    if (event.type === "status") {
      Object.assign(row, { status: data.status, attempts: data.attempts, error: data.error,
                           result: data.result || row.result });
      if (data.progress && Object.keys(data.progress).length) row.progress = data.progress;  // the final one
    } else row.progress = data;
    renderJobs();
    if (event.type === "status" && !ACTIVE.has(data.status)) { source.close(); jobs.streams.delete(job.id); }
  };
  source.addEventListener("status", update);
  source.addEventListener("progress", update);
  // the stream ends with the job, or breaks (a proxy, a restart): then the row is read again, and the poller
  // below keeps active rows current until the stream can be opened again
  source.onerror = () => { source.close(); jobs.streams.delete(job.id); refreshJob(job.id); };
}

async function refreshJob(id) {
  try {
    const fresh = await api(`/jobs/${encodeURIComponent(id)}`);
    const index = jobs.rows.findIndex((r) => r.id === id);
    if (index >= 0) jobs.rows[index] = fresh;
    renderJobs();
  } catch (error) { status(error.message); }
}

function pollActive() {
  if ($("page-jobs").hidden) return;
  const active = jobs.rows.filter((r) => ACTIVE.has(r.status) && !jobs.streams.has(r.id)).slice(0, 10);
  active.forEach((r) => { refreshJob(r.id).then(() => watch(jobs.rows.find((x) => x.id === r.id) || r)); });
}

async function loadJobs() {
  const asked = ++jobs.asked;  // a slow answer to an earlier request must not overwrite a newer list
  const rows = await api("/jobs?limit=50");
  if (asked !== jobs.asked) return;
  jobs.rows = rows;
  renderJobs();
  jobs.rows.forEach(watch);
}

function setupJobs() {
  fill($("job-policy"), POLICIES);
  $("job-form").onsubmit = submitJob;
  $("job-kind").onchange = () => {
    const study = $("job-kind").value === "study";
    document.querySelectorAll(".job-train").forEach((e) => { e.hidden = study; });
    document.querySelectorAll(".job-study").forEach((e) => { e.hidden = !study; });
  };
  document.querySelector("header nav button[data-page=jobs]").addEventListener("click", () => {
    loadJobs().catch((error) => status(error.message));
  });
  setInterval(pollActive, 3000);
}
