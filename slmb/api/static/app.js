// The slmb dashboard: runs with live curves (SSE), stop, submit, completed models, streamed generation.
// Plain JavaScript, no build step, no dependency. Every server string goes into the page as text (textContent,
// setAttribute), never as HTML; the page's Content-Security-Policy allows only this script.
"use strict";

// Relative URLs: the page also works behind a proxy that serves it under a path prefix.
const API = "api/v1";
const TOKEN_KEY = "slmb.token";
const TERMINAL = new Set(["finished", "stopped", "error"]);
const STATES = ["queued", "running", "finished", "stopped", "error"];
const RUNS_POLL_MS = 2000;
const HEALTH_POLL_MS = 10000;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------------ DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "text") el.textContent = String(value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, String(value));
  }
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function show(el, visible) {
  el.classList.toggle("hidden", !visible);
}

// ------------------------------------------------------------------------------------------------ formatting

function fmt(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

function fmtCount(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
  return n.toLocaleString("en-US");
}

function fmtDuration(sec) {
  if (sec === null || sec === undefined || !Number.isFinite(sec)) return "–";
  sec = Math.max(0, Math.round(sec));
  const hours = Math.floor(sec / 3600), min = Math.floor((sec % 3600) / 60), rest = sec % 60;
  if (hours) return `${hours}h ${String(min).padStart(2, "0")}m`;
  if (min) return `${min}m ${String(rest).padStart(2, "0")}s`;
  return `${rest}s`;
}

function fmtTime(created) {
  if (!created) return "";
  const date = typeof created === "number" ? new Date(created * (created > 1e12 ? 1 : 1000)) : new Date(created);
  if (Number.isNaN(date.getTime())) return String(created);
  const ago = (Date.now() - date.getTime()) / 1000;
  if (ago >= 0 && ago < 3600 * 20) return `${fmtDuration(ago)} ago`;
  return date.toLocaleString();
}

function pointer(path) {
  return path ? path : "/";
}

// ------------------------------------------------------------------------------------------------ token and API

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class AuthError extends Error {}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (token()) headers["Authorization"] = `Bearer ${token()}`;
  return headers;
}

function showAuthProblem() {
  const banner = $("auth-banner");
  banner.textContent = token()
    ? "The API token was refused (wrong token). Enter the server's SLMB_API_TOKEN in the API token field above."
    : "This server needs an API token (it runs with SLMB_API_TOKEN). Enter it in the API token field above.";
  banner.dataset.reason = token() ? "wrong" : "needed";
  show(banner, true);
  document.body.classList.add("auth-needed");
  $("token-input").focus();
}

function authOk() {
  show($("auth-banner"), false);
  document.body.classList.remove("auth-needed");
}

async function api(path, options = {}) {
  const opts = Object.assign({}, options);
  opts.headers = authHeaders(opts.json !== undefined ? {"Content-Type": "application/json"} : opts.headers);
  if (opts.json !== undefined) {
    opts.method = opts.method || "POST";
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  const sent = token();
  const resp = await fetch(API + path, opts);
  if (sent !== token()) {
    // The token changed while this request was out: its answer says nothing about the new one.
    if (resp.status === 401) throw new AuthError("token changed");
    return resp;
  }
  if (resp.status === 401) {
    showAuthProblem();
    throw new AuthError("token needed or wrong");
  }
  authOk();
  return resp;
}

async function readBody(resp) {
  const text = await resp.text();
  try {
    return JSON.parse(text);
  } catch (e) {
    return {detail: text || `${resp.status} ${resp.statusText}`};
  }
}

function detailText(body, resp) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg || JSON.stringify(d)}`).join("; ");
  }
  return `${resp.status} ${resp.statusText}`;
}

function globalError(message) {
  const el = $("global-error");
  el.textContent = message || "";
  show(el, Boolean(message));
}

// ------------------------------------------------------------------------------------------------ tabs

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.classList.toggle("active", panel.id === `panel-${name}`);
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "submit") loadExamples();
  if (name === "models" || name === "generate") loadModels();
  if (name === "runs") renderCharts();
}

// ------------------------------------------------------------------------------------------------ health

async function refreshHealth() {
  const el = $("health");
  try {
    const resp = await fetch("healthz");
    const body = await resp.json();
    const workers = body.workers && typeof body.workers.count === "number" ? body.workers.count : 0;
    clear(el);
    el.append(h("span", {class: `dot ${body.status === "ok" ? "ok" : "warn"}`}),
      `${workers} worker${workers === 1 ? "" : "s"}`);
    el.title = `redis ${body.redis && body.redis.ok ? "ok" : "down"} · mlflow ${body.mlflow && body.mlflow.ok ? "ok" : "down"}`;
    const ui = body.mlflow && body.mlflow.ui;
    if (typeof ui === "string" && /^https?:\/\//.test(ui)) {
      el.append(" · ", h("a", {href: ui, target: "_blank", rel: "noopener noreferrer"}, "MLflow"));
    }
  } catch (e) {
    clear(el).append(h("span", {class: "dot bad"}), "server unreachable");
  }
}

// ------------------------------------------------------------------------------------------------ runs list

const runsState = {runs: [], filter: "all", selected: null};

async function refreshRuns() {
  try {
    const resp = await api("/runs");
    if (!resp.ok) throw new Error(detailText(await readBody(resp), resp));
    runsState.runs = (await resp.json()).runs || [];
    globalError("");
  } catch (e) {
    if (!(e instanceof AuthError)) globalError(`Could not list the runs: ${e.message}`);
    return;
  }
  renderRuns();
  if (current) scheduleRender();
}

function runState(run) {
  if (current && current.taskId === run.task_id && current.state) return current.state;
  return run.state || "queued";
}

function renderRuns() {
  const list = clear($("runs-list"));
  const counts = {all: runsState.runs.length};
  for (const state of STATES) counts[state] = 0;
  for (const run of runsState.runs) counts[runState(run)] = (counts[runState(run)] || 0) + 1;
  const filters = clear($("run-filters"));
  for (const name of ["all", ...STATES]) {
    filters.append(h("button", {type: "button", class: `chip ${runsState.filter === name ? "active" : ""}`,
      "data-filter": name, onclick: () => { runsState.filter = name; renderRuns(); }},
    name, h("span", {class: "count"}, String(counts[name] || 0))));
  }
  const shown = runsState.runs.filter((r) => runsState.filter === "all" || runState(r) === runsState.filter);
  for (const run of shown) {
    const state = runState(run);
    const li = h("li", {class: `run ${runsState.selected === run.task_id ? "selected" : ""}`,
      "data-task-id": run.task_id, "data-state": state, tabindex: "0",
      onclick: () => selectRun(run.task_id), onkeydown: (e) => { if (e.key === "Enter") selectRun(run.task_id); }},
    h("div", {class: "run-line"}, h("span", {class: "run-name"}, run.model_name || "(unnamed)"),
      h("span", {class: `badge ${state}`}, state)),
    h("div", {class: "run-sub muted small"}, h("code", {}, run.task_id.slice(0, 8)),
      run.step !== null && run.step !== undefined ? ` · step ${fmt(run.step)}` : "", ` · ${fmtTime(run.created)}`));
    list.append(li);
  }
  $("runs-count").textContent = runsState.runs.length ? `${runsState.runs.length}` : "";
  show($("runs-empty"), shown.length === 0);
}

// ------------------------------------------------------------------------------------------------ run view

let current = null; // the followed run
const submittedWarnings = {}; // task id -> warnings of the submit response
const mlflowLinks = {}; // task id -> the submit response's mlflow_url

function newRun(taskId) {
  return {
    taskId, state: null, source: null, started: null, events: 0, total: null, step: null, epoch: null,
    epochs: null, loss: [], ema: [], val: [], evalTrain: [], lr: [], tps: [], mfu: [], last: {}, eta: null,
    elapsed: null, progress: null, warnings: [], message: null, bestVal: null, finished: null, log: [],
  };
}

function selectRun(taskId) {
  if (current && current.source) current.source.close();
  runsState.selected = taskId;
  current = newRun(taskId);
  const run = runsState.runs.find((r) => r.task_id === taskId);
  if (run) current.listed = run;
  show($("run-none"), false);
  show($("run-detail"), true);
  $("stop-button").disabled = false;
  $("stop-button").textContent = "Stop";
  clear($("event-log"));
  renderRuns();
  renderRun();
  connect(current);
  selectTab("runs");
}

function streamUrl(taskId) {
  const t = token();
  return `${API}/events/${encodeURIComponent(taskId)}` + (t ? `?token=${encodeURIComponent(t)}` : "");
}

function connect(run) {
  const source = new EventSource(streamUrl(run.taskId));
  run.source = source;
  source.onopen = () => { if (current === run && !TERMINAL.has(run.state)) setRunMessage(null); };
  source.onmessage = (e) => {
    if (current !== run) return;
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    handleEvent(run, msg.event, msg.data || {});
    if (TERMINAL.has(msg.event)) source.close();
    scheduleRender();
  };
  source.onerror = async () => {
    if (current !== run || TERMINAL.has(run.state)) return;
    if (source.readyState === EventSource.CONNECTING) {
      setRunMessage("The event stream was interrupted; reconnecting…", "warn");
      return;
    }
    // Closed for good: the server answered with an error status. Ask again to learn which.
    try {
      const resp = await api(`/events/${encodeURIComponent(run.taskId)}`, {headers: {}});
      const body = resp.ok ? null : await readBody(resp);
      if (resp.body && resp.ok) resp.body.cancel();
      if (resp.ok) {
        connect(run);
      } else {
        setRunMessage(`Cannot follow this run: ${detailText(body, resp)}`, "error");
      }
    } catch (e) {
      setRunMessage(e instanceof AuthError ? "Cannot follow this run: the API token is needed or wrong."
        : `Cannot follow this run: ${e.message}`, "error");
    }
  };
}

function setRunMessage(text, kind) {
  if (!current) return;
  current.message = text ? {text, kind: kind || "info"} : null;
  renderMessage();
}

function handleEvent(run, name, d) {
  run.events += 1;
  if (name !== "connected") {
    run.log.push({name, d});
    if (run.log.length > 500) run.log.shift();
  }
  switch (name) {
    case "queued":
      run.state = run.state || "queued";
      break;
    case "started":
      run.started = d;
      run.state = "running";
      run.total = d.total_steps;
      run.epochs = d.epochs;
      if (Array.isArray(d.warnings)) {
        for (const w of d.warnings) run.warnings.push(Object.assign({origin: "started"}, w));
      }
      break;
    case "step":
      run.state = "running";
      run.step = d.step;
      run.total = d.total_steps || run.total;
      run.epoch = d.epoch;
      run.last.loss = d.loss;
      run.last.lr = d.lr;
      if (d.tokens_per_sec !== null && d.tokens_per_sec !== undefined) run.last.tps = d.tokens_per_sec;
      if (d.mfu !== null && d.mfu !== undefined) run.last.mfu = d.mfu;
      run.last.grad_norm = d.grad_norm;
      push(run.loss, d.step, d.loss);
      push(run.lr, d.step, d.lr);
      push(run.tps, d.step, d.tokens_per_sec);
      push(run.mfu, d.step, d.mfu === null || d.mfu === undefined ? null : d.mfu * 100);
      break;
    case "progress":
      run.step = d.step;
      run.total = d.total_steps || run.total;
      run.progress = d.progress;
      run.eta = d.eta_s;
      run.elapsed = d.elapsed_s;
      run.epoch = d.epoch;
      run.epochs = d.epochs;
      if (d.loss_ema !== null && d.loss_ema !== undefined) {
        run.last.ema = d.loss_ema;
        push(run.ema, d.step, d.loss_ema);
      }
      if (d.tokens_per_sec !== null && d.tokens_per_sec !== undefined) run.last.tps = d.tokens_per_sec;
      if (d.mfu !== null && d.mfu !== undefined) run.last.mfu = d.mfu;
      break;
    case "eval":
      push(run.val, d.step, d.val_loss);
      push(run.evalTrain, d.step, d.train_loss);
      run.last.val = d.val_loss;
      run.last.evalTrain = d.train_loss;
      run.bestVal = d.best_val_loss;
      break;
    case "status":
      if (!TERMINAL.has(run.state)) run.state = d.state;
      if (d.message) setRunMessage(d.message, d.state === "error" ? "error" : "info");
      break;
    case "stop_requested":
      setRunMessage(d.force ? "Force stop requested." : "Stop requested: the run saves a checkpoint, then stops.",
        "warn");
      break;
    case "stop_forced":
      setRunMessage(d.message || "The run was killed.", "warn");
      break;
    case "stopped":
      run.state = "stopped";
      if (d.step !== null && d.step !== undefined) run.step = d.step;
      setRunMessage(`Stopped at step ${fmt(d.step)} (${d.reason || "requested"})` +
        (d.checkpoint ? "; a checkpoint was saved, the run can be resumed." : "; no checkpoint."), "warn");
      break;
    case "finished":
      run.state = "finished";
      run.finished = d;
      run.step = d.step;
      run.progress = 100;
      run.eta = 0;
      run.elapsed = d.elapsed_s;
      setRunMessage(`Finished: model ${d.model_name} saved (train loss ${fmt(d.train_loss)}, ` +
        `validation loss ${fmt(d.val_loss)}).`, "ok");
      loadModels();
      break;
    case "error":
      run.state = "error";
      setRunMessage(`Error (${d.type || "Error"}): ${d.message}`, "error");
      break;
    case "warning":
      run.warnings.push({origin: d.source || "warning", message: d.message, severity: "warning"});
      break;
    default:
      break;
  }
}

function push(series, x, y) {
  if (typeof x !== "number" || typeof y !== "number" || !Number.isFinite(y)) return;
  const last = series[series.length - 1];
  if (last && last[0] === x) last[1] = y;
  else series.push([x, y]);
}

let renderPending = false;

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => {
    renderPending = false;
    renderRun();
  }, 100);
}

function renderMessage() {
  const el = $("run-message");
  const msg = current && current.message;
  el.textContent = msg ? msg.text : "";
  el.className = `notice ${msg ? msg.kind : ""}`;
  show(el, Boolean(msg));
}

function stat(key, label, value, sub) {
  return h("div", {class: "stat", "data-stat": key}, h("div", {class: "stat-label"}, label),
    h("div", {class: "stat-value"}, value), sub ? h("div", {class: "stat-sub muted"}, sub) : null);
}

function renderRun() {
  const run = current;
  if (!run) return;
  const listed = runsState.runs.find((r) => r.task_id === run.taskId) || run.listed || {};
  const state = run.state || listed.state || "queued";
  const started = run.started || {};
  $("run-title").textContent = started.model_name || listed.model_name || "(unnamed)";
  $("run-id").textContent = run.taskId;
  const meta = [];
  if (started.parameters) meta.push(`${fmtCount(started.parameters)} parameters`);
  if (started.device) meta.push(`${started.device} ${started.dtype || ""}`.trim());
  if (started.dataset) meta.push(`dataset ${started.dataset}`);
  if (started.tokenizer) meta.push(`tokenizer ${started.tokenizer}`);
  if (started.batch_size) meta.push(`batch ${started.batch_size} × ${started.context_length}`);
  if (started.warmup_steps !== undefined && started.warmup_steps !== null) meta.push(`warmup ${started.warmup_steps} steps`);
  if (listed.created) meta.push(`created ${fmtTime(listed.created)}`);
  $("run-meta").textContent = meta.join(" · ");
  const links = clear($("run-links"));
  const mlflow = mlflowLinks[run.taskId] || listed.mlflow_url;
  if (typeof mlflow === "string" && /^https?:\/\//.test(mlflow)) {
    links.append(" · ", h("a", {href: mlflow, target: "_blank", rel: "noopener noreferrer"}, "MLflow run"));
  }
  const badge = $("run-state");
  badge.textContent = state;
  badge.className = `badge ${state}`;
  badge.dataset.state = state;
  const stop = $("stop-button");
  const active = state === "queued" || state === "running";
  stop.disabled = !active || stop.dataset.pending === run.taskId;
  show(stop, active);
  show($("stop-force").parentElement, active);

  const pct = run.progress !== null ? run.progress : (run.total && run.step ? (100 * run.step) / run.total : 0);
  $("run-progress").style.width = `${Math.min(100, Math.max(0, pct || 0))}%`;
  $("run-progress").className = `progress-bar ${state}`;

  const stats = clear($("run-stats"));
  stats.append(
    stat("step", "Step", run.step === null ? "–" : fmt(run.step), run.total ? `of ${fmt(run.total)}` +
      (run.epochs && run.epoch !== null ? ` · epoch ${fmt(run.epoch + 1)}/${fmt(run.epochs)}` : "") : null),
    stat("loss", "Train loss", fmt(run.last.loss), run.last.ema !== undefined ? `EMA ${fmt(run.last.ema)}` : null),
    stat("val", "Validation loss", fmt(run.last.val), run.bestVal !== null && run.bestVal !== undefined
      ? `best ${fmt(run.bestVal)}` : null),
    stat("lr", "Learning rate", fmt(run.last.lr, 3)),
    stat("tps", "Tokens / s", run.last.tps === undefined ? "–" : fmtCount(Math.round(run.last.tps))),
    stat("mfu", "MFU", run.last.mfu === undefined || run.last.mfu === null ? "–" : `${(run.last.mfu * 100).toFixed(1)}%`),
    stat("elapsed", "Elapsed", fmtDuration(run.elapsed)),
    stat("eta", "ETA", active ? fmtDuration(run.eta) : "–"),
  );

  const warnings = (submittedWarnings[run.taskId] || []).map((w) => Object.assign({origin: "submitted"}, w))
    .concat(run.warnings);
  const list = clear($("run-warnings-list"));
  for (const w of warnings) list.append(issueItem(w, w.origin));
  show($("run-warnings"), warnings.length > 0);

  renderMessage();
  renderCharts();
  renderLog();
}

function renderLog() {
  const run = current;
  const log = $("event-log");
  $("event-count").textContent = `(${run.log.length})`;
  if (!$("event-log").closest("details").open) return;
  clear(log);
  for (const item of run.log.slice(-200).reverse()) {
    log.append(h("li", {}, h("span", {class: `ev ev-${item.name}`}, item.name), " ", h("code", {}, summarize(item.d))));
  }
}

function summarize(d) {
  const skip = new Set(["task_id", "ts"]);
  return Object.entries(d).filter(([k]) => !skip.has(k)).map(([k, v]) =>
    `${k}=${typeof v === "object" && v !== null ? JSON.stringify(v) : typeof v === "number" ? fmt(v) : v}`).join(" ");
}

function renderCharts() {
  const run = current;
  if (!run || !$("panel-runs").classList.contains("active")) return;
  lineChart($("chart-loss"), [
    {key: "train", label: "train (step)", color: "var(--c1)", points: run.loss},
    {key: "ema", label: "train (EMA)", color: "var(--c3)", points: run.ema, dashed: true},
    {key: "val", label: "validation", color: "var(--c2)", points: run.val, dots: true},
  ], {xLabel: "step"});
  lineChart($("chart-lr"), [{key: "lr", label: "learning rate", color: "var(--c4)", points: run.lr}],
    {xLabel: "step", yFormat: (v) => v.toExponential(1)});
  lineChart($("chart-tps"), [{key: "tps", label: "tokens/s", color: "var(--c5)", points: run.tps}],
    {xLabel: "step", zero: true});
  lineChart($("chart-mfu"), [{key: "mfu", label: "MFU %", color: "var(--c6)", points: run.mfu}],
    {xLabel: "step", zero: true, yFormat: (v) => `${fmt(v, 3)}%`});
}

// ------------------------------------------------------------------------------------------------ SVG charts

function niceTicks(min, max, count) {
  if (!(max > min)) return [min];
  const span = max - min;
  const step0 = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const norm = step0 / mag;
  const step = (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// A line chart of numeric series into `container` (an SVG it owns). Each series' path carries data-count: the
// number of points it plots (tests read it).
function lineChart(container, series, opts = {}) {
  const width = Math.max(260, container.clientWidth || 460);
  const height = opts.height || 190;
  const m = {l: 56, r: 12, t: 8, b: 30};
  const all = series.flatMap((sr) => sr.points);
  clear(container);
  const svg = s("svg", {viewBox: `0 0 ${width} ${height}`, width, height, class: "line-chart", role: "img",
    "data-points": all.length});
  container.append(svg);
  if (all.length === 0) {
    const t = s("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty"});
    t.textContent = "waiting for data…";
    svg.append(t);
    for (const sr of series) svg.append(s("path", {class: `series series-${sr.key}`, "data-count": 0, d: ""}));
    container.append(legend(series));
    return;
  }
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  for (const [x, y] of all) {
    xmin = Math.min(xmin, x); xmax = Math.max(xmax, x); ymin = Math.min(ymin, y); ymax = Math.max(ymax, y);
  }
  if (opts.zero) ymin = Math.min(0, ymin);
  if (xmax === xmin) xmax = xmin + 1;
  if (ymax === ymin) { ymax += Math.abs(ymax) * 0.05 || 1; ymin -= opts.zero ? 0 : Math.abs(ymin) * 0.05 || 1; }
  const pad = (ymax - ymin) * 0.05;
  ymax += pad;
  if (!opts.zero || ymin < 0) ymin -= pad;
  const X = (x) => m.l + ((x - xmin) / (xmax - xmin)) * (width - m.l - m.r);
  const Y = (y) => m.t + (1 - (y - ymin) / (ymax - ymin)) * (height - m.t - m.b);
  const yf = opts.yFormat || ((v) => fmt(v, 3));

  for (const v of niceTicks(ymin, ymax, 4)) {
    svg.append(s("line", {x1: m.l, x2: width - m.r, y1: Y(v), y2: Y(v), class: "grid"}));
    const t = s("text", {x: m.l - 6, y: Y(v) + 4, "text-anchor": "end", class: "tick"});
    t.textContent = yf(v);
    svg.append(t);
  }
  for (const v of niceTicks(xmin, xmax, 5)) {
    if (v < xmin || v > xmax) continue;
    svg.append(s("line", {x1: X(v), x2: X(v), y1: height - m.b, y2: height - m.b + 4, class: "axis"}));
    const t = s("text", {x: X(v), y: height - m.b + 16, "text-anchor": "middle", class: "tick"});
    t.textContent = fmt(v);
    svg.append(t);
  }
  svg.append(s("line", {x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: "axis"}));
  if (opts.xLabel) {
    const t = s("text", {x: width - m.r, y: height - 2, "text-anchor": "end", class: "axis-label"});
    t.textContent = opts.xLabel;
    svg.append(t);
  }
  for (const sr of series) {
    const pts = sr.points;
    // Draw at most ~2 points per pixel; data-count is the series' length either way.
    const stride = Math.max(1, Math.floor(pts.length / (2 * (width - m.l - m.r))));
    let d = "";
    for (let i = 0; i < pts.length; i += stride) {
      d += `${d ? "L" : "M"}${X(pts[i][0]).toFixed(1)},${Y(pts[i][1]).toFixed(1)}`;
    }
    if (pts.length && (pts.length - 1) % stride) {
      const p = pts[pts.length - 1];
      d += `L${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`;
    }
    const path = s("path", {d, class: `series series-${sr.key}`, "data-count": pts.length, fill: "none",
      "stroke-width": sr.dots ? 1.5 : 1.6, "stroke-dasharray": sr.dashed ? "4 3" : null});
    path.style.stroke = sr.color;
    svg.append(path);
    if (sr.dots) {
      for (const p of pts.slice(-200)) {
        const c = s("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, class: `dot-${sr.key}`});
        c.style.fill = sr.color;
        const title = s("title", {});
        title.textContent = `step ${p[0]}: ${fmt(p[1])}`;
        c.append(title);
        svg.append(c);
      }
    }
  }
  hover(svg, series, X, Y, m, width, height, yf);
  container.append(legend(series));
}

function legend(series) {
  const el = h("div", {class: "legend"});
  for (const sr of series) {
    if (!sr.points.length && series.length > 1) continue;
    const last = sr.points[sr.points.length - 1];
    const sw = h("span", {class: `swatch ${sr.dashed ? "dashed" : ""}`});
    sw.style.background = sr.color;
    el.append(h("span", {class: "legend-item"}, sw, sr.label, last ? h("b", {}, ` ${fmt(last[1])}`) : null));
  }
  return el;
}

function hover(svg, series, X, Y, m, width, height, yf) {
  const line = s("line", {y1: m.t, y2: height - m.b, class: "cursor hidden"});
  const label = s("text", {y: m.t + 12, class: "cursor-label hidden"});
  svg.append(line, label);
  const xs = series.flatMap((sr) => sr.points.map((p) => p[0]));
  svg.addEventListener("mousemove", (e) => {
    const rect = svg.getBoundingClientRect();
    const px = ((e.clientX - rect.left) / rect.width) * width;
    let best = null;
    for (const x of xs) if (best === null || Math.abs(X(x) - px) < Math.abs(X(best) - px)) best = x;
    if (best === null) return;
    const parts = [`step ${best}`];
    for (const sr of series) {
      const p = sr.points.find((q) => q[0] === best);
      if (p) parts.push(`${sr.label} ${yf(p[1])}`);
    }
    line.setAttribute("x1", X(best));
    line.setAttribute("x2", X(best));
    const right = X(best) > width * 0.6;
    label.setAttribute("x", X(best) + (right ? -6 : 6));
    label.setAttribute("text-anchor", right ? "end" : "start");
    label.textContent = parts.join(" · ");
    line.classList.remove("hidden");
    label.classList.remove("hidden");
  });
  svg.addEventListener("mouseleave", () => { line.classList.add("hidden"); label.classList.add("hidden"); });
}

// ------------------------------------------------------------------------------------------------ stop

async function stopRun() {
  if (!current) return;
  const run = current;
  const force = $("stop-force").checked;
  const button = $("stop-button");
  button.disabled = true;
  button.dataset.pending = run.taskId;
  button.textContent = "Stopping…";
  try {
    const resp = await api("/stop-training", {json: {task_id: run.taskId, force_kill: force}});
    const body = await readBody(resp);
    if (!resp.ok) throw new Error(detailText(body, resp));
    if (!TERMINAL.has(run.state)) setRunMessage(body.message || "Stop requested.", "warn");
  } catch (e) {
    setRunMessage(e instanceof AuthError ? "Stop refused: the API token is needed or wrong." : `Stop failed: ${e.message}`,
      "error");
    delete button.dataset.pending;
    button.disabled = false;
  } finally {
    button.textContent = "Stop";
  }
}

// ------------------------------------------------------------------------------------------------ submit

let examples = null;

async function loadExamples() {
  if (examples) return;
  try {
    const resp = await api("/examples");
    if (!resp.ok) return;
    examples = (await resp.json()).examples || [];
  } catch (e) {
    return;
  }
  const select = $("example-select");
  for (const ex of examples) select.append(h("option", {value: ex.name}, `${ex.name} (${ex.file})`));
}

function issueItem(issue, origin) {
  const extra = [];
  if (issue.expected !== undefined && issue.expected !== null) extra.push(`expected ${issue.expected}`);
  if (issue.found !== undefined && issue.found !== null) {
    extra.push(`found ${typeof issue.found === "string" ? issue.found : JSON.stringify(issue.found)}`);
  }
  return h("li", {class: `issue ${issue.severity || "error"}`, "data-pointer": issue.path === undefined ? "" : issue.path,
    "data-origin": origin || null},
    issue.path !== undefined ? h("code", {class: "pointer"}, pointer(issue.path)) : null,
    origin ? h("span", {class: "origin muted small"}, origin) : null,
    h("span", {class: "issue-message"}, issue.message || ""),
    extra.length ? h("div", {class: "muted small"}, extra.join(" · ")) : null,
    issue.hint ? h("div", {class: "hint"}, issue.hint) : null);
}

function resetSubmit() {
  show($("submit-errors-box"), false);
  show($("submit-warnings-box"), false);
  show($("submit-result"), false);
  clear($("submit-errors"));
  clear($("submit-warnings"));
}

async function submitRequest() {
  resetSubmit();
  const status = $("submit-status");
  let body;
  try {
    body = JSON.parse($("request-json").value);
  } catch (e) {
    showSubmitErrors("The text is not valid JSON", [{message: e.message}]);
    return;
  }
  const button = $("submit-button");
  button.disabled = true;
  status.textContent = "validating…";
  try {
    const resp = await api("/train-complete-model", {json: body});
    const out = await readBody(resp);
    if (resp.status === 422 && Array.isArray(out.errors)) {
      showSubmitErrors(`${out.errors.length} error${out.errors.length === 1 ? "" : "s"}: the run was not queued`,
        out.errors);
      showSubmitWarnings(out.warnings);
      status.textContent = "";
      return;
    }
    if (!resp.ok) {
      showSubmitErrors(`Refused (${resp.status})`, [{message: detailText(out, resp)}]);
      status.textContent = "";
      return;
    }
    submittedWarnings[out.task_id] = out.warnings || [];
    if (typeof out.mlflow_url === "string" && /^https?:\/\//.test(out.mlflow_url)) mlflowLinks[out.task_id] = out.mlflow_url;
    status.textContent = "";
    const result = clear($("submit-result"));
    result.append(`Queued ${out.model_name || ""} as task `, h("code", {}, out.task_id), ". ",
      h("a", {href: "#runs", onclick: (e) => { e.preventDefault(); selectRun(out.task_id); }}, "Follow it"));
    show(result, true);
    showSubmitWarnings(out.warnings);
    await refreshRuns();
    selectRun(out.task_id);
  } catch (e) {
    status.textContent = "";
    if (!(e instanceof AuthError)) showSubmitErrors("The request could not be sent", [{message: e.message}]);
    else showSubmitErrors("The API token is needed or wrong", [{message: "Enter it in the API token field above."}]);
  } finally {
    button.disabled = false;
  }
}

function showSubmitErrors(title, errors) {
  $("submit-errors-title").textContent = title;
  const list = clear($("submit-errors"));
  for (const e of errors) list.append(issueItem(e));
  show($("submit-errors-box"), true);
}

function showSubmitWarnings(warnings) {
  const list = clear($("submit-warnings"));
  for (const w of warnings || []) list.append(issueItem(Object.assign({severity: "warning"}, w)));
  show($("submit-warnings-box"), (warnings || []).length > 0);
}

function loadFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const text = String(reader.result);
    try {
      $("request-json").value = JSON.stringify(JSON.parse(text), null, 2);
    } catch (e) {
      $("request-json").value = text;
    }
    $("submit-status").textContent = `loaded ${file.name}`;
    resetSubmit();
  };
  reader.readAsText(file);
}

// ------------------------------------------------------------------------------------------------ models

let models = [];
let selectedModel = null;

async function loadModels() {
  try {
    const resp = await api("/completed-models");
    if (!resp.ok) throw new Error(detailText(await readBody(resp), resp));
    models = (await resp.json()).models || [];
  } catch (e) {
    if (!(e instanceof AuthError)) globalError(`Could not list the models: ${e.message}`);
    return;
  }
  renderModels();
}

function modelLoss(m, key) {
  return m.metrics && typeof m.metrics === "object" ? m.metrics[key] : undefined;
}

function renderModels() {
  const list = clear($("models-list"));
  for (const m of models) {
    list.append(h("li", {class: `run ${selectedModel === m.model_name ? "selected" : ""}`, tabindex: "0",
      "data-model": m.model_name, onclick: () => selectModel(m.model_name),
      onkeydown: (e) => { if (e.key === "Enter") selectModel(m.model_name); }},
    h("div", {class: "run-line"}, h("span", {class: "run-name"}, m.model_name),
      h("span", {class: `badge ${m.status === "ok" ? "finished" : "error"}`}, m.status === "ok" ? m.source || "ok" : m.status)),
    h("div", {class: "run-sub muted small"}, m.parameters ? `${fmtCount(m.parameters)} params · ` : "",
      modelLoss(m, "val_loss") !== undefined && modelLoss(m, "val_loss") !== null
        ? `val ${fmt(modelLoss(m, "val_loss"))} · ` : "", fmtTime(m.created))));
  }
  show($("models-empty"), models.length === 0);
  const select = $("gen-model");
  const chosen = select.value;
  clear(select);
  for (const m of models.filter((x) => x.status !== "broken")) {
    select.append(h("option", {value: m.model_name}, m.model_name));
  }
  if (chosen && models.some((m) => m.model_name === chosen)) select.value = chosen;
}

async function selectModel(name) {
  selectedModel = name;
  renderModels();
  show($("model-none"), false);
  show($("model-detail"), true);
  $("model-title").textContent = name;
  clear($("model-nodes"));
  clear($("model-stats")).append(h("span", {class: "muted"}, "loading…"));
  show($("model-errors"), false);
  let d;
  try {
    const resp = await api(`/completed-models/${encodeURIComponent(name)}`);
    d = await readBody(resp);
    if (!resp.ok) throw new Error(detailText(d, resp));
  } catch (e) {
    clear($("model-stats")).append(h("span", {class: "error-text"},
      e instanceof AuthError ? "The API token is needed or wrong." : e.message));
    return;
  }
  if (selectedModel !== name) return;
  const m = d.model || {};
  const loss = d.final_losses || {};
  clear($("model-stats")).append(
    stat("parameters", "Parameters", fmtCount(d.parameters), d.parameters ? d.parameters.toLocaleString("en-US") : null),
    stat("train_loss", "Train loss", fmt(loss.train_loss), loss.last_step_loss !== null && loss.last_step_loss !== undefined
      ? `last step ${fmt(loss.last_step_loss)}` : null),
    stat("val_loss", "Validation loss", fmt(loss.val_loss), loss.best_val_loss !== null && loss.best_val_loss !== undefined
      ? `best ${fmt(loss.best_val_loss)}` : null),
    stat("steps", "Steps", fmt(d.steps), m.elapsed_s ? `in ${fmtDuration(m.elapsed_s)}` : null),
    stat("context", "Context / vocab", `${fmt(d.context_length || m.context_length)} / ${fmt(d.vocab_size || m.vocab_size)}`),
    stat("data", "Data", m.dataset || "–", m.tokenizer ? `tokenizer ${m.tokenizer}` : null),
  );
  const errors = (d.summary_errors || []).concat(m.error ? [{path: "", message: m.error}] : []);
  const errList = clear($("model-errors"));
  for (const e of errors) errList.append(issueItem(e));
  show(errList, errors.length > 0);
  const body = clear($("model-nodes"));
  for (const row of d.nodes || []) {
    const type = h("td", {}, row.type);
    type.style.paddingLeft = `${0.6 + row.depth * 1.1}em`;
    body.append(h("tr", {"data-node": row.path}, h("td", {}, h("code", {}, row.path)), type,
      h("td", {}, h("code", {}, row.output_shape)), h("td", {class: "num"}, row.parameters ? row.parameters.toLocaleString("en-US") : "–"),
      h("td", {class: "muted small"}, row.note || "")));
  }
}

// ------------------------------------------------------------------------------------------------ generate

let generation = null;

function numberOr(id, fallback) {
  const raw = $(id).value.trim();
  if (raw === "") return fallback;
  const v = Number(raw);
  return Number.isFinite(v) ? v : fallback;
}

async function generate() {
  const model = $("gen-model").value;
  const status = $("gen-status");
  if (!model) {
    status.textContent = "No completed model to generate with yet.";
    return;
  }
  if (generation) generation.abort();
  const controller = new AbortController();
  generation = controller;
  const out = $("gen-out-text");
  const prompt = $("gen-prompt").value;
  out.textContent = "";
  $("gen-out-prompt").textContent = prompt;
  const output = $("gen-output");
  output.dataset.deltas = "0";
  output.dataset.state = "running";
  const seed = numberOr("gen-seed", null);
  const topP = numberOr("gen-top-p", 1);
  const body = {
    model_name: model, input_text: prompt, max_length: Math.round(numberOr("gen-max", 100)),
    temperature: numberOr("gen-temperature", 0.8), top_k: Math.round(numberOr("gen-top-k", 0)),
    top_p: topP >= 1 ? null : topP, repetition_penalty: numberOr("gen-rep", 1),
    seed: seed === null ? null : Math.round(seed),
  };
  $("gen-button").disabled = true;
  $("gen-cancel").disabled = false;
  status.textContent = "loading the model…";
  let deltas = 0;
  try {
    const resp = await api("/generate-text/stream", {json: body, signal: controller.signal});
    if (!resp.ok) {
      const err = await readBody(resp);
      throw new Error(detailText(err, resp));
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        const msg = JSON.parse(data);
        if (msg.event === "start") status.textContent = "generating…";
        else if (msg.event === "delta") {
          out.textContent += msg.data.text;
          deltas += 1;
          output.dataset.deltas = String(deltas);
        } else if (msg.event === "done") {
          const d = msg.data;
          status.textContent = `${d.new_tokens} tokens · ${fmt(d.tokens_per_sec, 3)} tokens/s · ${d.finish_reason}`;
          output.dataset.state = "done";
        } else if (msg.event === "error") {
          throw new Error(`${msg.data.detail || "generation failed"}` +
            (msg.data.request_id ? ` (request ${msg.data.request_id})` : ""));
        }
      }
    }
    if (output.dataset.state !== "done") output.dataset.state = "ended";
  } catch (e) {
    output.dataset.state = "error";
    if (e.name === "AbortError") status.textContent = "cancelled";
    else status.textContent = e instanceof AuthError ? "The API token is needed or wrong." : `Error: ${e.message}`;
  } finally {
    if (generation === controller) generation = null;
    $("gen-button").disabled = false;
    $("gen-cancel").disabled = true;
  }
}

// ------------------------------------------------------------------------------------------------ start-up

function refreshAll() {
  refreshHealth();
  refreshRuns();
  if ($("panel-models").classList.contains("active") || $("panel-generate").classList.contains("active")) loadModels();
  if ($("panel-submit").classList.contains("active")) loadExamples();
}

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  $("token-input").value = token();
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token-input").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    authOk();
    examples = null;
    refreshAll();
    if (current && !TERMINAL.has(current.state)) selectRun(current.taskId);
  });
  $("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    refreshAll();
  });
  $("stop-button").addEventListener("click", stopRun);
  $("submit-button").addEventListener("click", submitRequest);
  $("format-button").addEventListener("click", () => {
    resetSubmit();
    try {
      $("request-json").value = JSON.stringify(JSON.parse($("request-json").value), null, 2);
    } catch (e) {
      showSubmitErrors("The text is not valid JSON", [{message: e.message}]);
    }
  });
  $("request-file").addEventListener("change", (e) => {
    if (e.target.files && e.target.files[0]) loadFile(e.target.files[0]);
    e.target.value = "";
  });
  $("example-select").addEventListener("change", (e) => {
    const ex = (examples || []).find((x) => x.name === e.target.value);
    if (ex) {
      $("request-json").value = JSON.stringify(ex.request, null, 2);
      $("submit-status").textContent = `loaded ${ex.file}`;
      resetSubmit();
    }
  });
  $("models-refresh").addEventListener("click", loadModels);
  $("model-generate").addEventListener("click", () => {
    if (selectedModel) {
      selectTab("generate");
      $("gen-model").value = selectedModel;
      $("gen-prompt").focus();
    }
  });
  $("gen-button").addEventListener("click", generate);
  $("gen-cancel").addEventListener("click", () => { if (generation) generation.abort(); });
  $("gen-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  document.querySelector("#run-detail details").addEventListener("toggle", renderLog);
  window.addEventListener("resize", () => scheduleRender());
  const tab = location.hash.slice(1);
  selectTab(["runs", "submit", "models", "generate"].includes(tab) ? tab : "runs");
  refreshAll();
  setInterval(refreshRuns, RUNS_POLL_MS);
  setInterval(refreshHealth, HEALTH_POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
