// glassmind's page: chat with per-token probabilities, the autopsy of a token, ranking, the scheduler view.
// Every piece of model or user text enters the page through textContent (never as markup), and the page
// fetches nothing but this server's own routes.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, models: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
                                                 : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({ error: { message: "the server answered " + r.status } }));
  if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
  return data;
}

// -- tabs and models ------------------------------------------------------------------------------------
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === b);
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + b.dataset.view;
  });
}

async function loadModels() {
  try {
    const data = await api("/v1/models");
    state.models = data.data;
    const sel = $("model");
    sel.replaceChildren(...data.data.map((m) => { const o = el("option", "", m.id); o.value = m.id; return o; }));
  } catch (e) {
    $("messages").replaceChildren(el("p", "error", "Could not list models: " + e.message));
  }
}
$("apikey").addEventListener("change", loadModels);

// -- chat -------------------------------------------------------------------------------------------------------
function shade(p) {  // probability -> background: white at 0, blue at 1
  const a = Math.max(0, Math.min(1, p));
  return `rgba(42, 111, 219, ${(0.08 + 0.6 * a).toFixed(3)})`;
}

function showTip(ev, tok) {
  const tip = $("tooltip");
  const lines = [`${JSON.stringify(tok.token)}  p=${Math.exp(tok.logprob).toFixed(4)}`];
  for (const alt of tok.top_logprobs || []) lines.push(`  ${JSON.stringify(alt.token).padEnd(18)} ${Math.exp(alt.logprob).toFixed(4)}`);
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - 260) + "px";
  tip.style.top = (ev.clientY + 14) + "px";
}

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  m.append(el("span", "who", role === "user" ? "you" : "model"));
  const body = el("span", "body");
  if (text) body.textContent = text;
  m.append(body);
  $("messages").append(m);
  $("messages").scrollTop = $("messages").scrollHeight;
  return { m, body };
}

async function send(text) {
  const model = $("model").value;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const { m, body } = addMessage("assistant", "");
  const reply = { prompt: null, ids: [], text: "" };
  const req = { model, messages: state.history, stream: true, logprobs: true, top_logprobs: 5,
                return_token_ids: true, max_tokens: Number($("max-tokens").value) || 64,
                temperature: Number($("temperature").value), stream_options: { include_usage: true } };
  if ($("seed").value !== "") req.seed = Number($("seed").value);
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  const t0 = performance.now();
  let n = 0, finish = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(req),
                                                    signal: state.controller.signal });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const c = chunk.choices && chunk.choices[0];
        if (!c) continue;
        if (c.prompt_token_ids) reply.prompt = c.prompt_token_ids;
        if (c.finish_reason) finish = c.finish_reason;
        const lp = c.logprobs && c.logprobs.content && c.logprobs.content[0];
        if (!lp || !c.token_ids) continue;
        const index = reply.ids.length;
        reply.ids.push(c.token_ids[0]);
        n += 1;
        const text = (c.delta && c.delta.content) || "";
        reply.text += text;
        const span = el("span", "tok", text);
        span.style.background = shade(Math.exp(lp.logprob));
        span.dataset.index = String(index);
        span.addEventListener("mouseenter", (ev) => showTip(ev, lp));
        span.addEventListener("mousemove", (ev) => showTip(ev, lp));
        span.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
        span.addEventListener("click", () => openAutopsy(model, reply, index, lp, span));
        body.append(span);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else m.append(el("span", "meta error", e.message));
  } finally {
    state.controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
  const secs = (performance.now() - t0) / 1000;
  m.append(el("span", "meta", `${n} tokens, ${(n / Math.max(secs, 1e-3)).toFixed(1)} tokens/s, ${finish}`));
  state.history.push({ role: "assistant", content: reply.text });
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });

// -- autopsy ------------------------------------------------------------------------------------------------------
let autopsyData = null;

async function openAutopsy(model, reply, index, lp, span) {
  for (const s of document.querySelectorAll(".tok.selected")) s.classList.remove("selected");
  span.classList.add("selected");
  const panel = $("autopsy");
  panel.hidden = false;
  $("autopsy-title").textContent = `Why the model wrote ${JSON.stringify(lp.token)} (reply token ${index + 1}, p=${Math.exp(lp.logprob).toFixed(4)})`;
  $("autopsy-status").textContent = "running the autopsy...";
  $("autopsy-body").hidden = true;
  // the sequence the model had read when it chose this token, and the token as the target
  const ids = (reply.prompt || []).concat(reply.ids.slice(0, index));
  try {
    autopsyData = await api("/glassmind/autopsy", { model, ids, position: -1, target: reply.ids[index], top_k: 5 });
    renderAutopsy(autopsyData);
    $("autopsy-status").textContent = "";
    $("autopsy-body").hidden = false;
  } catch (e) {
    $("autopsy-status").replaceChildren(el("span", "error", e.message));
  }
}
$("autopsy-close").addEventListener("click", () => { $("autopsy").hidden = true; });

function renderAutopsy(a) {
  $("narration").replaceChildren(...(a.narration || []).map((n) => el("li", "", n.text)));
  const L = (a.attention || []).length;
  $("att-layer").replaceChildren(...Array.from({ length: L }, (_, i) => { const o = el("option", "", String(i)); o.value = i; return o; }));
  const H = L ? a.attention[0].length : 0;
  $("att-head").replaceChildren(...Array.from({ length: H }, (_, i) => { const o = el("option", "", String(i)); o.value = i; return o; }));
  drawAttention();
  // lens: rows = layers, columns = positions; each cell the top piece, shaded by the target's probability
  const lens = a.lens || [];
  const rows = [];
  const head = el("tr");
  head.append(el("th", "", "layer \\ token"));
  for (const t of a.tokens || []) head.append(el("th", "", JSON.stringify(t)));
  rows.push(head);
  lens.forEach((layer, li) => {
    const tr = el("tr");
    tr.append(el("th", "", String(li)));
    for (const cell of layer) {
      const top = cell.top && cell.top[0] ? cell.top[0] : ["", 0];
      const td = el("td", "", `${JSON.stringify(top[0])} ${Number(top[1]).toFixed(2)}`);
      td.style.background = shade(cell.target_prob || 0);
      td.title = `target p=${Number(cell.target_prob).toFixed(4)} rank ${cell.target_rank}, entropy ${Number(cell.entropy).toFixed(2)}, KL to final ${Number(cell.kl_to_final).toFixed(3)}`;
      tr.append(td);
    }
    rows.push(tr);
  });
  $("lens").replaceChildren(...rows);
  const attr = a.attribution || [];
  const big = Math.max(1e-9, ...attr.map((x) => Math.abs(x.value)));
  $("attribution").replaceChildren(...attr.map((x) => {
    const row = el("div", "bar");
    row.append(el("span", "label", x.component));
    const fill = el("span", "fill " + (x.value >= 0 ? "pos" : "neg"));
    fill.style.width = (120 * Math.abs(x.value) / big).toFixed(1) + "px";
    row.append(fill, el("span", "", Number(x.value).toFixed(3)));
    return row;
  }));
  const ab = [el("tr")];
  ab[0].append(el("th", "", "component"), el("th", "", "logprob before"), el("th", "", "after ablation"));
  for (const x of a.ablation || []) {
    const tr = el("tr");
    tr.append(el("td", "", x.component), el("td", "", Number(x.logprob_before).toFixed(3)), el("td", "", Number(x.logprob_after).toFixed(3)));
    ab.push(tr);
  }
  $("ablation").replaceChildren(...ab);
}

function drawAttention() {
  const c = $("attention"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!autopsyData || !(autopsyData.attention || []).length) return;
  const m = autopsyData.attention[Number($("att-layer").value) || 0][Number($("att-head").value) || 0];
  const T = m.length, s = c.width / Math.max(T, 1);
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    g.fillStyle = `rgba(42, 111, 219, ${Math.max(0, Math.min(1, m[i][j]))})`;
    g.fillRect(j * s, i * s, Math.ceil(s), Math.ceil(s));
  }
}
$("att-layer").addEventListener("change", drawAttention);
$("att-head").addEventListener("change", drawAttention);

// -- ranking ---------------------------------------------------------------------------------------------------------
let ranking = null;

$("rank-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("rank-prompt").value;
  if (!prompt.trim()) return;
  $("rank-status").textContent = "sampling...";
  $("rank-submit").disabled = true;
  try {
    const data = await api("/glassmind/rank/sample", { model: $("model").value, prompt, k: Number($("rank-k").value) || 4 });
    ranking = { prompt, responses: data.responses };
    $("rank-replies").replaceChildren(...data.responses.map((r, i) => {
      const li = el("li");
      const input = el("input");
      input.type = "number"; input.min = "1"; input.max = String(data.responses.length); input.value = String(i + 1);
      input.className = "rank-input";
      input.setAttribute("aria-label", "rank of reply " + (i + 1));
      li.append(input, el("span", "", r));
      return li;
    }));
    $("rank-status").textContent = data.responses.length < 2 ? "fewer than 2 distinct replies: sample again"
                                                              : "rank them (1 = best; equal = tie) and submit";
    $("rank-submit").disabled = data.responses.length < 2;
  } catch (e) {
    $("rank-status").replaceChildren(el("span", "error", e.message));
  }
});

$("rank-submit").addEventListener("click", async () => {
  if (!ranking) return;
  const ranks = Array.from(document.querySelectorAll(".rank-input"), (i) => Number(i.value));
  try {
    const data = await api("/glassmind/rank", { prompt: ranking.prompt, responses: ranking.responses, ranking: ranks });
    $("rank-status").textContent = `saved: ${data.rankings} rankings in the preference file`;
    $("rank-submit").disabled = true;
  } catch (e) {
    $("rank-status").replaceChildren(el("span", "error", e.message));
  }
});

// -- scheduler -------------------------------------------------------------------------------------------------------
async function pollScheduler() {
  if (!$("view-sched").hidden) {
    try {
      const data = await api("/glassmind/scheduler");
      const rows = [], queue = [], parts = [];
      for (const m of data.models) {
        parts.push(`${m.model}: ${m.slots.length}/${m.max_batch} slots busy, ${m.waiting.length} waiting, ${m.tokens_per_s} tokens/s, ${m.steps} steps`);
        for (const s of m.slots) {
          const tr = el("tr");
          for (const v of [m.model, s.slot, s.request, s.choice, s.tokens]) tr.append(el("td", "", String(v)));
          rows.push(tr);
        }
        for (const q of m.waiting) queue.push(el("li", "", `${m.model}: ${q}`));
      }
      $("sched-summary").textContent = parts.join(" | ");
      $("sched-slots").tBodies[0].replaceChildren(...rows);
      $("sched-queue").replaceChildren(...queue);
    } catch (e) {
      $("sched-summary").replaceChildren(el("span", "error", e.message));
    }
  }
  setTimeout(pollScheduler, 500);
}

loadModels();
pollScheduler();
