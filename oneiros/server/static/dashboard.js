// The arena dashboard: polls /v1/dashboard and draws the arena's page owners over time, a table
// of per-model state and a log of remap and restore events. No dependencies, no build step.
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(200, Number(params.get("interval")) || 1000);
const HISTORY = 600; // samples kept (10 minutes at the default interval)
const KINDS = ["resident", "slab", "kv"];
const history = []; // {t, free, models: {name: {resident, slab, kv}}}
const marks = []; // {t, text}
let previous = null;
let polls = 0;

function hue(i) { return (i * 137.5 + 210) % 360; }
function colour(i, kind) {
  const light = { resident: 32, slab: 52, kv: 74 }[kind];
  return `hsl(${hue(i)}, 55%, ${light}%)`;
}
function ms(v) { return v == null ? "-" : (v * 1000).toFixed(v < 0.1 ? 1 : 0); }
function text(el, value) { el.textContent = String(value); }

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = value;
  row.appendChild(td);
}

function renderTable(d) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren();
  Object.entries(d.models).forEach(([name, m]) => {
    const row = document.createElement("tr");
    row.dataset.model = name;
    cell(row, m.names.join(", "));
    cell(row, m.pages.resident);
    cell(row, m.pages.slab);
    cell(row, m.pages.kv);
    cell(row, `${m.layers_resident} / ${m.num_layers}`);
    cell(row, `${(m.kv_usage * 100).toFixed(1)}%`);
    cell(row, m.kv_blocks_cached);
    cell(row, m.prefix_hit_rate === null ? "-" : `${(m.prefix_hit_rate * 100).toFixed(1)}%`);
    cell(row, m.waiting);
    cell(row, m.running);
    cell(row, `${ms(m.ttft_p50)} / ${ms(m.ttft_p99)} ms`);
    cell(row, `${ms(m.tbt_p50)} / ${ms(m.tbt_p99)} ms`);
    cell(row, m.remap_events);
    cell(row, m.restore_events);
    cell(row, m.preemptions);
    body.appendChild(row);
  });
}

function renderLegend(names) {
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  const add = (label, fill) => {
    const span = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = fill;
    span.append(swatch, label);
    legend.appendChild(span);
  };
  names.forEach((n, i) => KINDS.forEach((k) => add(`${n} ${k}`, colour(i, k))));
  add("free", "#e4e4e4");
}

function renderChart(d) {
  const canvas = document.getElementById("arena");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800;
  const height = 320;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.dataset.samples = String(history.length);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 48, right = 8, top = 8, bottom = 24;
  const w = width - left - right, h = height - top - bottom;
  const total = d.num_pages || 1;
  const t1 = history[history.length - 1].t;
  const t0 = Math.min(history[0].t, t1 - 1);
  const x = (t) => left + ((t - t0) / Math.max(1e-9, t1 - t0)) * w;
  const y = (p) => top + h - (p / total) * h;
  const names = Object.keys(d.models);
  const layers = [];
  names.forEach((n, i) => KINDS.forEach((k) => layers.push({ get: (s) => (s.models[n] || {})[k] || 0, fill: colour(i, k) })));
  layers.push({ get: (s) => s.free, fill: "#e4e4e4" });
  const base = history.map(() => 0);
  for (const layer of layers) {
    const topv = history.map((s, j) => base[j] + layer.get(s));
    g.beginPath();
    history.forEach((s, j) => { const px = x(s.t); if (j === 0) g.moveTo(px, y(topv[j])); else { g.lineTo(px, y(topv[j - 1])); g.lineTo(px, y(topv[j])); } });
    g.lineTo(x(t1), y(topv[topv.length - 1]));
    g.lineTo(x(t1), y(base[base.length - 1]));
    for (let j = history.length - 1; j >= 0; j--) { g.lineTo(x(history[j].t), y(base[j])); if (j > 0) g.lineTo(x(history[j].t), y(base[j - 1])); }
    g.closePath();
    g.fillStyle = layer.fill;
    g.fill();
    topv.forEach((v, j) => { base[j] = v; });
  }
  g.strokeStyle = "rgba(200, 0, 0, 0.6)";
  for (const mark of marks) {
    if (mark.t < t0) continue;
    g.beginPath(); g.moveTo(x(mark.t), top); g.lineTo(x(mark.t), top + h); g.stroke();
  }
  g.fillStyle = "#444";
  g.font = "11px sans-serif";
  g.fillText(String(total), 4, top + 10);
  g.fillText("0", 4, top + h);
  g.fillText(`${Math.round(t1 - t0)} s`, left + w - 30, height - 6);
  g.fillText("pages", 4, top + h / 2);
  renderLegend(names);
}

function noteEvents(d) {
  if (previous === null) return;
  const list = document.getElementById("events");
  for (const [name, m] of Object.entries(d.models)) {
    const before = previous.models[name];
    if (!before) continue;
    const remapped = m.remap_events - before.remap_events;
    const restored = m.restore_events - before.restore_events;
    for (const [n, what] of [[remapped, "remapped into KV cache"], [restored, "restored"]]) {
      if (n <= 0) continue;
      const item = document.createElement("li");
      const when = new Date(d.time * 1000).toLocaleTimeString();
      item.textContent = `${when}  ${name}: ${n} layer(s) ${what}; ${m.layers_resident}/${m.num_layers} resident`;
      list.prepend(item);
      marks.push({ t: d.time, text: item.textContent });
    }
  }
  while (marks.length > 200) marks.shift();
}

function update(d) {
  polls += 1;
  const sample = { t: d.time, free: d.free_pages, models: {} };
  for (const [name, m] of Object.entries(d.models)) sample.models[name] = m.pages;
  history.push(sample);
  while (history.length > HISTORY) history.shift();
  noteEvents(d);
  const status = document.getElementById("status");
  text(status, d.status);
  status.className = d.status === "ok" ? "" : "bad";
  text(document.getElementById("pages"), `${d.num_pages} x ${(d.page_bytes / 1048576).toFixed(0)} MiB`);
  text(document.getElementById("free"), d.free_pages);
  text(document.getElementById("inflight"), d.in_flight);
  text(document.getElementById("updated"), new Date(d.time * 1000).toLocaleTimeString());
  text(document.getElementById("polls"), polls);
  renderTable(d);
  renderChart(d);
  previous = d;
}

async function poll() {
  try {
    const r = await fetch("/v1/dashboard", { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    update(await r.json());
  } catch (e) {
    const status = document.getElementById("status");
    text(status, `error: ${e.message}`);
    status.className = "bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
