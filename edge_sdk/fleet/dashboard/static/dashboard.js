// edge-sdk fleet dashboard: plain JS, no libraries, no external fetches. Charts are inline SVG.
// Stable hooks for tests: #devices tbody tr[data-device], .badge.state-*, svg.chart path.line, #alerts li.
"use strict";

const REFRESH_MS = 5000;
const PSI_ALERT = 0.2;
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { selected: decodeURIComponent(location.hash.slice(1)) || null, devices: [], since: 3600, timer: null };

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

async function api(path) {
  const res = await fetch(path, { cache: "no-store" });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(`${path}: ${body.error || res.status}`);
  return body;
}

// ---- formatting --------------------------------------------------------------------------------------
const isNum = (v) => typeof v === "number" && isFinite(v);
const fmt = (v, digits) => (isNum(v) ? v.toFixed(digits) : "–");
const fmtPct = (v, digits = 1) => (isNum(v) ? `${(v * 100).toFixed(digits)}%` : "–");
const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "–");

function ago(seconds) {
  if (!isNum(seconds)) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function clock(ts, withSeconds) {
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return withSeconds ? `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}` : `${p(d.getHours())}:${p(d.getMinutes())}`;
}

const keyOf = (r) => `${r.fleet}/${r.device}`;

// ---- summary cards and tables -------------------------------------------------------------------------
function renderSummary(devices, alerts) {
  const count = (s) => devices.filter((d) => d.state === s).length;
  $("#card-online .value").textContent = count("online");
  $("#card-stale .value").textContent = count("stale");
  $("#card-offline .value").textContent = count("offline");
  $("#card-inferences .value").textContent = fmtInt(devices.reduce((a, d) => a + (d.inferences || 0), 0));
  $("#card-alerts .value").textContent = alerts.length;
  $("#card-alerts").classList.toggle("hot", alerts.length > 0);
  $("#card-stale").classList.toggle("warm", count("stale") > 0);
  $("#card-offline").classList.toggle("hot", count("offline") > 0);
}

function cell(text, cls, title) {
  return el("td", { class: cls, title }, text);
}

function renderDevices(devices, now) {
  const body = $("#devices tbody");
  const rows = devices.map((d) => {
    const key = keyOf(d);
    const psiCls = isNum(d.psi_latest) && d.psi_latest > PSI_ALERT ? "num bad" : "num";
    const errCls = isNum(d.error_rate) && d.error_rate > 0.05 ? "num bad" : "num";
    const tr = el("tr", { "data-device": key, class: key === state.selected ? "selected" : null, tabindex: "0" },
      el("td", { class: "device" }, el("span", { class: "dev-name" }, d.device), el("span", { class: "dev-fleet" }, d.fleet)),
      el("td", null, el("span", { class: `badge state-${d.state}`, title: d.state_reason || d.state }, d.state)),
      cell(d.model_name ? `${d.model_name} v${d.model_version}` : "–", "model"),
      cell(fmtInt(d.inferences), "num"),
      cell(fmt(d.p95_ms, 1), "num", isNum(d.p50_ms) ? `p50 ${fmt(d.p50_ms, 1)} · p99 ${fmt(d.p99_ms, 1)}` : null),
      cell(fmtPct(d.error_rate, 2), errCls),
      cell(fmt(d.confidence_mean, 3), "num"),
      cell(fmt(d.psi_latest, 3), psiCls, isNum(d.psi_max) ? `max in range ${fmt(d.psi_max, 3)}` : null),
      cell(d.labelled ? fmtPct(d.accuracy) : "–", "num", d.labelled ? `${d.correct}/${d.labelled} labelled` : "no feedback"),
      cell(d.alerts_open ? String(d.alerts_open) : "0", d.alerts_open ? "num bad" : "num muted"),
      cell(ago(isNum(d.last_window_at) ? now - d.last_window_at : null), "muted"));
    tr.addEventListener("click", () => select(key));
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") select(key); });
    return tr;
  });
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", { class: "empty" }, el("td", { colspan: "11" }, "No devices have reported yet.")));
  $("#device-count").textContent = `${devices.length} device${devices.length === 1 ? "" : "s"}`;
}

function renderAlerts(alerts, now) {
  const list = $("#alerts");
  list.replaceChildren(...alerts.map((a) => el("li", { class: `alert sev-${a.severity}`, "data-rule": a.rule },
    el("span", { class: "alert-rule" }, a.rule),
    el("span", { class: "alert-where" }, a.device ? `${a.fleet}/${a.device}` : a.fleet),
    el("span", { class: "alert-msg", title: a.message }, a.message),
    el("span", { class: "alert-when muted" }, ago(now - a.opened_at)))));
  if (!alerts.length) list.append(el("li", { class: "alert none muted" }, "No open alerts."));
  $("#alert-count").textContent = alerts.length ? `${alerts.length} open` : "";
}

function renderModels(models) {
  const body = $("#models tbody");
  body.replaceChildren(...models.map((m) => el("tr", { "data-model": `${m.model_name}@${m.model_version}` },
    cell(`${m.model_name} v${m.model_version}`, "model"), cell(fmtInt(m.devices), "num"), cell(fmtInt(m.inferences), "num"),
    cell(fmt(m.p50_ms, 1), "num"), cell(fmt(m.p95_ms, 1), "num"), cell(fmtPct(m.error_rate, 2), "num"),
    cell(fmt(m.confidence_mean, 3), "num"), cell(fmt(m.psi_max, 3), isNum(m.psi_max) && m.psi_max > PSI_ALERT ? "num bad" : "num"),
    cell(m.labelled ? fmtPct(m.accuracy) : "–", "num"))));
  if (!models.length) body.append(el("tr", { class: "empty" }, el("td", { colspan: "9" }, "No windows in range.")));
}

// ---- charts -------------------------------------------------------------------------------------------
// a "nice" axis step: 4 steps of a round number x 10^k covering v
function niceStep(v) {
  if (!isNum(v) || v <= 0) return 0.25;
  const raw = v / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

const tickText = (v) => String(Number(v.toFixed(3)));

// series: [{name, cls, values: [[t, v], ...]}]; opts: {yMax, yMin, threshold}
function renderChart(host, series, opts = {}) {
  const W = 420, H = 190, L = 40, R = 10, T = 10, B = 24;
  const pts = series.flatMap((s) => s.values.filter((p) => isNum(p[1])));
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" });
  if (!pts.length) {
    chart.classList.add("empty");
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" });
    t.textContent = "no data in range";
    chart.append(t);
    host.replaceChildren(chart);
    return;
  }
  const ts = pts.map((p) => p[0]);
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (t1 === t0) { t0 -= 1; t1 += 1; }
  const yMin = opts.yMin ?? 0;
  const yMax = opts.yMax ?? yMin + 4 * niceStep(Math.max(...pts.map((p) => p[1]), (opts.threshold ?? 0) * 1.25) - yMin);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (Math.min(Math.max(v, yMin), yMax) - yMin) / (yMax - yMin)) * (H - T - B);
  const grid = svg("g", { class: "grid" });
  for (let i = 0; i <= 4; i++) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    grid.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" });
    label.textContent = tickText(v);
    grid.append(label);
  }
  const withSeconds = t1 - t0 < 600;
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    const label = svg("text", { x: x(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle", class: "tick" });
    label.textContent = clock(t, withSeconds);
    grid.append(label);
  }
  chart.append(grid);
  if (isNum(opts.threshold)) {
    chart.append(svg("line", { class: "threshold", x1: L, x2: W - R, y1: y(opts.threshold), y2: y(opts.threshold) }));
  }
  // a gap of more than 3 typical steps (the device was away) breaks the line instead of bridging it
  const times = [...new Set(ts)].sort((a, b) => a - b);
  const steps = times.slice(1).map((t, i) => t - times[i]).sort((a, b) => a - b);
  const maxStep = steps.length ? 3 * steps[Math.floor(steps.length / 2)] : Infinity;
  for (const s of series) {
    let d = "", pen = "M", prev = null;
    for (const [t, v] of s.values) {
      if (!isNum(v)) { pen = "M"; continue; }
      if (prev !== null && t - prev > maxStep) pen = "M";
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
      prev = t;
    }
    if (d) chart.append(svg("path", { class: `line ${s.cls}`, d, "data-points": String(s.values.length) }));
  }
  const legend = el("div", { class: "legend" }, ...series.map((s) => el("span", { class: `key ${s.cls}` }, s.name)));
  if (isNum(opts.threshold)) legend.append(el("span", { class: "key threshold" }, `alert > ${opts.threshold}`));
  host.replaceChildren(chart, legend);
}

async function renderDetail(now) {
  const d = state.devices.find((r) => keyOf(r) === state.selected);
  if (!d) return;
  $("#detail-title").textContent = d.device;
  $("#detail-meta").textContent = `${d.fleet} · ${d.model_name || "?"} v${d.model_version || "?"}` +
    `${d.runtime ? ` · ${d.runtime}` : ""}${d.artifact ? ` · ${d.artifact}` : ""} · ${d.windows} windows in range`;
  const path = `/api/devices/${encodeURIComponent(d.fleet)}/${encodeURIComponent(d.device)}/series?since=${state.since}&max_points=240`;
  const { points } = await api(path);
  const col = (k) => points.map((p) => [p.end_ts, p[k]]);
  renderChart($("#chart-latency"), [{ name: "p50", cls: "p50", values: col("p50_ms") }, { name: "p95", cls: "p95", values: col("p95_ms") }]);
  renderChart($("#chart-confidence"), [{ name: "mean confidence", cls: "conf", values: col("conf_mean") }], { yMin: 0, yMax: 1 });
  renderChart($("#chart-drift"), [{ name: "PSI", cls: "psi", values: col("psi_max") }], { threshold: PSI_ALERT });
}

function select(key) {
  state.selected = key;
  history.replaceState(null, "", `#${encodeURIComponent(key)}`);
  for (const tr of document.querySelectorAll("#devices tbody tr")) tr.classList.toggle("selected", tr.dataset.device === key);
  refresh();
}

// ---- refresh loop -------------------------------------------------------------------------------------
async function refresh() {
  clearTimeout(state.timer);
  try {
    const q = `since=${state.since}`;
    const [dev, al, mod] = await Promise.all([api(`/api/devices?${q}`), api("/api/alerts?state=open&limit=50"), api(`/api/models?${q}`)]);
    state.devices = dev.devices;
    if (!state.devices.some((r) => keyOf(r) === state.selected)) {
      // nothing chosen yet: show the device that needs attention most (open alerts, online first)
      const score = (r) => r.alerts_open * 2 + (r.state === "online" ? 1 : 0);
      const first = state.devices.reduce((best, r) => (best === null || score(r) > score(best) ? r : best), null);
      state.selected = first ? keyOf(first) : null;
    }
    renderSummary(dev.devices, al.alerts);
    renderDevices(dev.devices, dev.now);
    renderAlerts(al.alerts, dev.now);
    renderModels(mod.models);
    await renderDetail(dev.now);
    $("#error").hidden = true;
    $("#updated").textContent = `updated ${clock(dev.now, true)}`;
  } catch (err) {
    $("#error").hidden = false;
    $("#error").textContent = `Cannot load fleet data: ${err.message}`;
  } finally {
    state.timer = setTimeout(refresh, REFRESH_MS);
  }
}

$("#range").addEventListener("change", (e) => { state.since = Number(e.target.value); refresh(); });
state.since = Number($("#range").value);
refresh();
