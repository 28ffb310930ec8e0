// sparsedial playground: plain JS, no dependencies, talks only to this origin.
// /health -> tiers for the dials; POST /generate (SSE) per pane; /status polled every second for the live
// panel; GET|PUT /admin/tier with the bearer token typed into the admin section.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tiers: [], choices: ["auto"], running: null, admin: null };

// ------------------------------------------------------------------------------------------ helpers
async function errorMessage(resp) {
  // The server's error body is {"error": {"message", ...}}; fall back to the status line.
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
    if (body && body.detail) return String(body.detail);
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`.trim();
}

function show(el, text) { el.textContent = text; el.hidden = !text; }

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

// ------------------------------------------------------------------------------------------ dials
function dialTier(pane) { return state.choices[Number($(`dial-${pane}`).value)] || "auto"; }

function updateDial(pane) {
  const tier = dialTier(pane);
  $(`dial-${pane}-name`).textContent = tier;
  $(`dial-${pane}`).dataset.tier = tier;
  for (const li of $(`dial-${pane}-labels`).children) li.classList.toggle("on", li.dataset.tier === tier);
}

function setDial(pane, tier) {
  const i = state.choices.indexOf(tier);
  if (i >= 0) { $(`dial-${pane}`).value = String(i); updateDial(pane); }
}

function buildDials(tiers) {
  state.tiers = tiers;
  state.choices = ["auto", ...tiers];
  const ticks = $("dial-ticks");
  ticks.replaceChildren(...state.choices.map((t, i) => {
    const o = document.createElement("option");
    o.value = String(i); o.label = t;
    return o;
  }));
  for (const pane of ["a", "b"]) {
    const dial = $(`dial-${pane}`);
    dial.max = String(state.choices.length - 1);
    const labels = $(`dial-${pane}-labels`);
    labels.replaceChildren(...state.choices.map((t) => {
      const li = document.createElement("li");
      li.textContent = t; li.dataset.tier = t; li.title = `serve at ${t}`;
      li.addEventListener("click", () => setDial(pane, t));
      return li;
    }));
    dial.addEventListener("input", () => updateDial(pane));
    updateDial(pane);
  }
  setDial("b", tiers.includes("2:4") ? "2:4" : tiers[tiers.length - 1]);
}

// ------------------------------------------------------------------------------------------ generation
function resetPane(pane, tier) {
  $(`out-${pane}`).textContent = "";
  for (const k of ["served", "ttft", "tps", "tokens"]) $(`${k}-${pane}`).textContent = "–";
  const st = $(`state-${pane}`);
  st.textContent = `requesting ${tier}`; st.className = "";
}

function finishPane(pane, ev) {
  const t = ev.timings || {};
  const n = (ev.usage && ev.usage.completion_tokens) || 0;
  $(`out-${pane}`).textContent = ev.text;
  $(`served-${pane}`).textContent = ev.tier;
  $(`ttft-${pane}`).textContent = fmtSeconds(t.ttft_s);
  $(`tps-${pane}`).textContent = t.e2e_s > 0 ? (n / t.e2e_s).toFixed(1) : "–";
  $(`tokens-${pane}`).textContent = String(n);
  $(`state-${pane}`).textContent = `done (${ev.finish_reason})`;
}

function paneError(pane, message) {
  const st = $(`state-${pane}`);
  st.textContent = `error: ${message}`; st.className = "error";
}

function handleEvent(pane, data, counts) {
  if (data === "[DONE]") return true;
  const ev = JSON.parse(data);
  if (ev.error) { paneError(pane, ev.error.message || "stream error"); return true; }
  if (ev.type === "token") {
    $(`out-${pane}`).textContent += ev.text;
    counts.n += 1;
    $(`tokens-${pane}`).textContent = String(counts.n);
    $(`state-${pane}`).textContent = "streaming";
  } else if (ev.type === "finish") {
    finishPane(pane, ev);
  }
  return false;
}

async function runPane(pane, tier, body, signal) {
  resetPane(pane, tier);
  try {
    const headers = { "content-type": "application/json", accept: "text/event-stream" };
    const key = $("api-key").value.trim();  // SPARSEDIAL_API_KEY, when the server sets one
    if (key) headers.authorization = `Bearer ${key}`;
    const resp = await fetch("/generate", {
      method: "POST", signal, headers,
      body: JSON.stringify({ ...body, sparsity: tier, stream: true }),
    });
    if (!resp.ok) { paneError(pane, await errorMessage(resp)); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const counts = { n: 0 };
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buf))) {  // one SSE event per blank-line-terminated block
        const block = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data && handleEvent(pane, data, counts)) { reader.cancel().catch(() => {}); return; }
      }
      if (done) break;
    }
  } catch (err) {
    paneError(pane, err.name === "AbortError" ? "stopped" : String(err.message || err));
  }
}

async function generate() {
  const max = Number($("max-tokens").value), temp = Number($("temperature").value);
  show($("request-error"), "");
  if (!Number.isInteger(max) || max < 1) { show($("request-error"), "max_tokens must be a whole number ≥ 1"); return; }
  if (!Number.isFinite(temp) || temp < 0) { show($("request-error"), "temperature must be a number ≥ 0"); return; }
  const body = { prompt: $("prompt").value, max_tokens: max, temperature: temp };
  const ctl = new AbortController();
  state.running = ctl;
  $("generate").disabled = true; $("stop").disabled = false;
  const panes = $("compare").checked ? ["a", "b"] : ["a"];
  await Promise.all(panes.map((p) => runPane(p, dialTier(p), body, ctl.signal)));
  state.running = null;
  $("generate").disabled = false; $("stop").disabled = true;
}

// ------------------------------------------------------------------------------------------ live panel
async function pollStatus() {
  try {
    const resp = await fetch("/status", { cache: "no-store" });
    if (!resp.ok) {
      show($("live-error"), await errorMessage(resp));
    } else {
      const s = await resp.json();
      show($("live-error"), "");
      $("live-running").textContent = String(s.running);
      $("live-waiting").textContent = String(s.waiting);
      $("live-kv-used").textContent = String(s.kv_slots_used);
      $("live-kv-total").textContent = String(s.kv_slots_total);
      $("live-kv-meter").value = s.kv_slots_total ? s.kv_slots_used / s.kv_slots_total : 0;
      $("live-auto").textContent = s.current_auto_tier;
      $("live-default").textContent = s.default_tier;
      $("live-mode").textContent = s.mode;
      $("live-updated").textContent = new Date().toLocaleTimeString();
    }
  } catch (err) {
    show($("live-error"), `server unreachable: ${err.message || err}`);
  }
  setTimeout(pollStatus, 1000);
}

async function waitForHealth() {
  for (;;) {
    try {
      const resp = await fetch("/health", { cache: "no-store" });
      const h = await resp.json();
      if (resp.ok && h.status === "ok") return h;
      $("health").textContent = h.status === "failed" ? `failed: ${h.detail || ""}` : "engine loading…";
    } catch (_) {
      $("health").textContent = "server unreachable";
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------------------------------ admin
function adminHeaders() {
  return { authorization: `Bearer ${$("admin-token").value.trim()}`, "content-type": "application/json" };
}

function tierSelect(value, cls, id) {
  const sel = document.createElement("select");
  sel.className = cls; sel.id = id;
  for (const t of state.tiers) sel.add(new Option(t, t, false, t === value));
  return sel;
}

function ladderRow(step) {
  const tr = document.createElement("tr");
  const i = $("admin-ladder").children.length;
  const th = document.createElement("input");
  th.type = "number"; th.min = "0"; th.step = "any"; th.value = String(step.threshold);
  th.className = "ladder-threshold"; th.id = `ladder-threshold-${i}`;
  const rm = document.createElement("button");
  rm.type = "button"; rm.textContent = "×"; rm.title = "remove step"; rm.className = "ladder-remove";
  rm.id = `ladder-remove-${i}`;
  rm.addEventListener("click", () => tr.remove());
  for (const el of [th, tierSelect(step.tier, "ladder-tier", `ladder-tier-${i}`), rm]) {
    const td = document.createElement("td"); td.append(el); tr.append(td);
  }
  return tr;
}

function renderPolicy(t) {
  state.admin = t;
  const def = $("admin-default");
  def.replaceChildren(...t.tiers.map((x) => new Option(x, x, false, x === t.policy.default_tier)));
  $("admin-mode").value = t.policy.mode;
  $("admin-signal").value = t.policy.signal;
  $("admin-hysteresis").value = String(t.policy.hysteresis);
  $("admin-ladder").replaceChildren();
  for (const step of t.policy.ladder) $("admin-ladder").append(ladderRow(step));
  $("admin-editor").hidden = false;
}

async function adminCall(method, body) {
  show($("admin-error"), "");
  if (!$("admin-token").value.trim()) { show($("admin-error"), "enter the admin token"); return null; }
  try {
    const resp = await fetch("/admin/tier", { method, headers: adminHeaders(), body: body && JSON.stringify(body) });
    if (!resp.ok) { show($("admin-error"), `${resp.status}: ${await errorMessage(resp)}`); return null; }
    const t = await resp.json();
    renderPolicy(t);
    return t;
  } catch (err) {
    show($("admin-error"), String(err.message || err));
    return null;
  }
}

async function adminConnect() {
  const t = await adminCall("GET");
  if (t) $("admin-status").textContent = `connected; auto now serves ${t.current_auto_tier}`;
  else $("admin-editor").hidden = true;
}

async function adminSave(e) {
  e.preventDefault();
  const ladder = [...$("admin-ladder").children].map((tr) => ({
    threshold: Number(tr.querySelector(".ladder-threshold").value),
    tier: tr.querySelector(".ladder-tier").value,
  }));
  const body = {
    default_tier: $("admin-default").value, mode: $("admin-mode").value, signal: $("admin-signal").value,
    hysteresis: Number($("admin-hysteresis").value) || 0, ladder,
  };
  const t = await adminCall("PUT", body);
  if (t) $("admin-status").textContent = `saved ${new Date().toLocaleTimeString()}; auto now serves ${t.current_auto_tier}`;
}

// ------------------------------------------------------------------------------------------ start
function wire() {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.running && state.running.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
  });
  $("compare").addEventListener("change", () => {
    $("pane-b").hidden = !$("compare").checked;
    document.body.classList.toggle("comparing", $("compare").checked);
  });
  $("admin-connect").addEventListener("click", adminConnect);
  $("admin-token").addEventListener("keydown", (e) => { if (e.key === "Enter") adminConnect(); });
  $("admin-reload").addEventListener("click", adminConnect);
  $("admin-editor").addEventListener("submit", adminSave);
  $("admin-add-step").addEventListener("click", () => {
    const last = state.admin && state.admin.policy.ladder.slice(-1)[0];
    $("admin-ladder").append(ladderRow({ threshold: last ? last.threshold * 2 : 8, tier: state.tiers.slice(-1)[0] }));
  });
}

async function main() {
  wire();
  pollStatus();
  const h = await waitForHealth();
  $("model-name").textContent = h.model;
  $("health").textContent = `ready · ${h.tiers.length} tiers`;
  $("health").classList.remove("muted");
  buildDials(h.tiers);
  $("generate").disabled = false;
  document.body.dataset.ready = "1";
}

main();
