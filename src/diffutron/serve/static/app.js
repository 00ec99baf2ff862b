// diffutron web page: a chat box that draws the answer while it denoises.
// Plain JS, no build step, no outside resources. It talks to the same OpenAI-compatible API
// as any client: POST /v1/chat/completions with stream: true and
// stream_options.include_denoising, then reads server-sent events. A chunk whose choice has a
// `denoising` object is one intermediate canvas (null = a masked slot); content deltas are the
// final text, sent block by block.
// The page speaks Turkish (English in the title attributes). Its sampler defaults are the
// server's, rendered into each field's data-default (those of `diffutron generate`); nothing
// here hard-codes one. Like `diffutron chat`, it always sends a seed: turn N uses seed + N.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FIELDS = ["max_tokens", "steps", "block_length", "temperature", "top_p", "repetition_penalty",
    "remasking", "threshold", "cfg_scale", "seed"];
  const INTS = new Set(["max_tokens", "steps", "block_length", "seed"]);
  const SAVED = "diffutron.settings.v1";
  const LABELS = { max_tokens: "en çok token", steps: "adım", block_length: "blok uzunluğu", temperature: "sıcaklık",
    top_p: "top p", repetition_penalty: "tekrar cezası", threshold: "eşik", cfg_scale: "CFG ölçeği", seed: "tohum" };
  // what an HTTP error means, in Turkish; the server's own (English) message follows it
  const HTTP_ERRORS = { 400: "Geçersiz istek", 401: "API anahtarı gerekli ya da yanlış", 404: "Bulunamadı",
    413: "İstek çok uzun", 422: "Geçersiz ayar", 429: "Sunucu meşgul, biraz sonra yeniden deneyin",
    500: "Sunucu hatası", 503: "Sunucu hazır değil" };
  const EMPTY_ANSWER = "(boş yanıt: model sırasını hemen bitirdi)";
  const state = { model: null, limits: {}, history: [], busy: false, controller: null };

  // ------------------------------------------------------------------ settings
  function saveSettings() {
    const s = { system: $("system").value, denoise: $("show-denoising").checked, key: $("api-key").value };
    for (const f of FIELDS) s[f] = $(f).value;
    try { localStorage.setItem(SAVED, JSON.stringify(s)); } catch (e) { /* private mode */ }
  }

  function restoreSettings() {
    let s = null;
    try { s = JSON.parse(localStorage.getItem(SAVED) || "null"); } catch (e) { s = null; }
    if (!s) return;
    for (const f of FIELDS) if (typeof s[f] === "string" && s[f] !== "") $(f).value = s[f];
    if (typeof s.remasking === "string" && s.remasking) $("remasking").dataset.touched = "1";
    if (typeof s.system === "string") $("system").value = s.system;
    if (typeof s.denoise === "boolean") $("show-denoising").checked = s.denoise;
    if (typeof s.key === "string") $("api-key").value = s.key;
  }

  // the server's defaults (data-default) shown as placeholders; an empty field sends nothing (seed: its default)
  function applyDefaults() {
    for (const f of FIELDS) {
      const el = $(f), d = el.dataset.default;
      if (f === "remasking") { if (d && !el.dataset.touched) el.value = d; continue; }
      el.placeholder = d !== "" ? d : (el.dataset.off || "");
    }
    stepsPlaceholder();
  }

  // empty steps: the server keeps the defaults' tokens per step for the chosen max tokens
  function stepsPlaceholder() {
    const tokens = Number($("max_tokens").value), d = $("max_tokens").dataset.default, steps = $("steps").dataset.default;
    $("steps").placeholder = tokens >= 1 && Number(d) >= 1 ? String(Math.ceil(tokens * Number(steps) / Number(d))) : steps;
  }

  function applyLimits() {
    const lim = state.limits;
    if (lim.max_tokens) $("max_tokens").max = lim.max_tokens;
    if (lim.max_steps) $("steps").max = lim.max_steps;
  }

  function resetSettings() {
    for (const f of FIELDS) $(f).value = "";
    $("remasking").dataset.touched = "";
    $("system").value = "";
    $("show-denoising").checked = true;
    applyDefaults();
    saveSettings();
  }

  // the request's sampler fields; the seed always (the field's, else the default) plus the turn, as `diffutron chat`
  function samplerFields(turn) {
    const out = {};
    for (const f of FIELDS) {
      const raw = $(f).value.trim() || (f === "seed" ? $(f).dataset.default : "");
      if (raw === "") continue;
      if (f === "remasking") { out[f] = raw; continue; }
      const num = Number(raw);
      if (!Number.isFinite(num)) throw new Error(`${LABELS[f]} bir sayı olmalı`);
      out[f] = INTS.has(f) ? Math.trunc(num) : num;
    }
    if (out.seed !== undefined) out.seed += turn;
    return out;
  }

  function openSettings(open) {
    const panel = $("settings");
    panel.hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  }

  // ------------------------------------------------------------------ API
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) detail = body.error.message;
    } catch (e) { /* not JSON */ }
    const what = HTTP_ERRORS[response.status] || "Hata";
    return `${what} (HTTP ${response.status})` + (detail ? `: ${detail}` : "");
  }

  async function loadModel() {
    try {
      const r = await fetch("/v1/models", { headers: headers() });
      if (r.status === 401) {
        $("model").textContent = "API anahtarı gerekli";
        setStatus("Bu sunucu bir API anahtarı istiyor: Ayarlar'dan girin.", "error");
        openSettings(true);
        return;
      }
      if (!r.ok) throw new Error(await errorMessage(r));
      const card = (await r.json()).data[0];
      state.model = card.id;
      state.limits = card.limits || {};
      $("model").textContent = card.id;
      applyLimits();
      setStatus("");
    } catch (e) {
      $("model").textContent = "çevrimdışı";
      setStatus("Sunucuya ulaşılamıyor: " + e.message, "error");
    }
  }

  // Reads server-sent events; calls onData for every JSON payload until [DONE].
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { reader.cancel().catch(() => {}); return; }
          onData(JSON.parse(data));
        }
      }
    }
  }

  // ------------------------------------------------------------------ views
  const log = $("log");

  function nearBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 80; }
  function follow(stick) { if (stick) log.scrollTop = log.scrollHeight; }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }

  function addUser(text) {
    $("empty").hidden = true;
    const el = document.createElement("div");
    el.className = "msg user";
    el.textContent = text;
    log.append(el);
    follow(true);
  }

  class AssistantView {
    constructor(showDenoising) {
      const node = $("assistant-template").content.firstElementChild.cloneNode(true);
      this.el = node;
      this.canvas = node.querySelector(".canvas");
      this.textEl = node.querySelector(".text");
      this.meta = node.querySelector(".meta");
      this.replay = node.querySelector(".replay");
      this.scrub = node.querySelector(".scrub");
      this.play = node.querySelector(".play");
      this.show = showDenoising;
      this.frames = [];
      this.text = "";
      this.pending = false;
      this.timer = 0;
      this.scrub.addEventListener("input", () => { this.stopReplay(); this.draw(Number(this.scrub.value)); });
      this.play.addEventListener("click", () => this.startReplay());
      log.append(node);
      follow(true);
    }

    frame(d) {
      this.frames.push(d);
      const el = this.el;
      el.dataset.frames = String(this.frames.length);
      el.dataset.maxMasked = String(Math.max(Number(el.dataset.maxMasked), d.masked));
      el.dataset.state = "denoising";
      if (!this.pending) {  // draw at most once per animation frame
        this.pending = true;
        requestAnimationFrame(() => { this.pending = false; if (this.el.dataset.state === "denoising") this.draw(this.frames.length - 1); });
      }
    }

    delta(text) {
      this.text += text;
      if (!this.show || !this.frames.length) {
        const stick = nearBottom();
        this.el.dataset.state = "streaming";
        this.textEl.textContent = this.text;
        follow(stick);
      }
    }

    draw(index) {
      const d = this.frames[index];
      if (!d) return;
      const prev = index > 0 ? this.frames[index - 1] : null;
      const stick = nearBottom();
      const L = Math.max(1, d.block_length);
      const blocks = [];
      for (let b = 0; b * L < d.tokens.length; b++) {
        const block = document.createElement("span");
        block.className = "block" + (d.masked && b === d.block ? " active" : "") + (d.masked && b > d.block ? " future" : "");
        for (let i = b * L; i < Math.min((b + 1) * L, d.tokens.length); i++) {
          const t = d.tokens[i];
          const slot = document.createElement("span");
          slot.className = "tok";
          if (t === null) { slot.classList.add("masked"); slot.textContent = "\u00a0"; }
          else if (t === "") { slot.classList.add("pad"); slot.textContent = "\u00b7"; }
          else {
            slot.textContent = t;
            if (prev && prev.tokens[i] === null) slot.classList.add("new");
          }
          block.append(slot);
        }
        blocks.push(block);
      }
      this.canvas.replaceChildren(...blocks);
      this.canvas.dataset.step = String(d.step);
      this.canvas.hidden = false;
      follow(stick);
    }

    finish(info) {
      this.el.dataset.state = "done";
      this.el.dataset.finish = info.finish || "";
      this.textEl.textContent = this.text || EMPTY_ANSWER;
      if (!this.text) {
        this.textEl.classList.add("muted");
        this.textEl.title = "empty answer: the model ended its turn at once";
      }
      const parts = [];
      if (info.usage) parts.push(`${info.usage.completion_tokens} token`);
      if (this.frames.length) parts.push(`${this.frames.length} adım`);
      parts.push(`${info.seconds.toLocaleString("tr-TR", { minimumFractionDigits: 2, maximumFractionDigits: 2 })} sn`);
      if (info.finish) parts.push(info.finish === "length" ? "uzunluk sınırı" : "bitti");
      this.meta.textContent = parts.join(" · ");
      this.meta.title = "tokens · denoising steps · seconds · finish reason: " + (info.finish === "length"
        ? "length (hit max tokens)" : (info.finish || "none"));
      if (this.frames.length > 1) {
        this.draw(this.frames.length - 1);
        this.canvas.hidden = true;
        this.replay.hidden = false;
        this.scrub.max = String(this.frames.length - 1);
        this.scrub.value = this.scrub.max;
      } else {
        this.canvas.hidden = true;
      }
    }

    fail(message, kind) {
      this.stopReplay();
      this.el.dataset.state = kind || "error";
      this.el.classList.add(kind || "error");
      this.canvas.hidden = this.frames.length === 0;
      this.textEl.textContent = (this.text ? this.text + "\n\n" : "") + message;
    }

    startReplay() {
      this.stopReplay();
      let i = 0;
      this.canvas.hidden = false;
      this.timer = setInterval(() => {
        this.draw(i);
        this.scrub.value = String(i);
        if (++i >= this.frames.length) this.stopReplay();
      }, 60);
    }

    stopReplay() { if (this.timer) { clearInterval(this.timer); this.timer = 0; } }
  }

  // ------------------------------------------------------------------ chat
  function setBusy(busy) {
    state.busy = busy;
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("prompt").readOnly = busy;
  }

  async function send(text) {
    if (state.busy || !text.trim()) return;
    let fields;
    try { fields = samplerFields(state.history.length / 2); } catch (e) { setStatus(e.message, "error"); return; }
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history, { role: "user", content: text });
    const showDenoising = $("show-denoising").checked;
    const body = { messages, stream: true,
      stream_options: { include_usage: true, include_denoising: showDenoising }, ...fields };
    if (state.model) body.model = state.model;

    addUser(text);
    $("prompt").value = "";
    const view = new AssistantView(showDenoising);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("");
    const started = performance.now();
    const info = { finish: null, usage: null, seconds: 0 };
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
        body: JSON.stringify(body), signal: controller.signal });
      if (!r.ok) {
        const message = await errorMessage(r);
        view.fail(message);
        if (r.status === 401) openSettings(true);
        return;
      }
      await readEvents(r.body, (chunk) => {
        if (chunk.error) throw new Error("Sunucu hatası" + (chunk.error.message ? ": " + chunk.error.message : ""));
        if (chunk.usage) info.usage = chunk.usage;
        for (const c of chunk.choices || []) {
          if (c.index !== 0) continue;
          if (c.denoising) view.frame(c.denoising);
          if (c.delta && c.delta.content) view.delta(c.delta.content);
          if (c.finish_reason) info.finish = c.finish_reason;
        }
      });
      info.seconds = (performance.now() - started) / 1000;
      view.finish(info);
      state.history.push({ role: "user", content: text }, { role: "assistant", content: view.text });
    } catch (e) {
      if (e.name === "AbortError") view.fail("(durduruldu)", "stopped");
      else view.fail(e.message || String(e));
    } finally {
      state.controller = null;
      setBusy(false);
      $("prompt").focus();
    }
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    for (const el of [...log.querySelectorAll(".msg")]) el.remove();
    $("empty").hidden = false;
    setStatus("");
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    restoreSettings();
    applyDefaults();
    const wide = window.matchMedia("(min-width: 960px)");
    openSettings(wide.matches);  // beside the chat on wide screens; on phones only when asked
    wide.addEventListener("change", (e) => openSettings(e.matches));
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send($("prompt").value); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send($("prompt").value); }
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("new-chat").addEventListener("click", newChat);
    $("settings-toggle").addEventListener("click", () => openSettings($("settings").hidden));
    $("reset-settings").addEventListener("click", resetSettings);
    $("remasking").addEventListener("change", () => { $("remasking").dataset.touched = "1"; });
    for (const ev of ["input", "change"]) $("max_tokens").addEventListener(ev, stepsPlaceholder);
    for (const el of document.querySelectorAll("#settings input, #settings select, #settings textarea")) {
      el.addEventListener("change", saveSettings);
    }
    $("api-key").addEventListener("change", loadModel);
    for (const b of document.querySelectorAll(".example")) {
      b.addEventListener("click", () => { $("prompt").value = b.textContent; $("prompt").focus(); });
    }
    loadModel();
  }

  init();
})();
