// forge's chat page: talks to this server's OpenAI API (/v1/models, /v1/chat/completions with SSE).
// Plain browser JavaScript, no build step. Model output is markdown rendered by marked and always
// sanitized by DOMPurify before it becomes HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEYS = { chats: "forge.chats", current: "forge.currentChat", settings: "forge.settings", apiKey: "forge.apiKey" };
  const DEFAULT_SETTINGS = { system: "", temperature: "0.7", maxTokens: "512", seed: "" };
  const MAX_CHATS = 200;

  const store = {
    get(key, fallback) {
      try {
        const raw = localStorage.getItem(key);
        return raw === null ? fallback : JSON.parse(raw);
      } catch {
        return fallback; // unreadable (or storage disabled): start clean rather than break the page
      }
    },
    set(key, value) {
      localStorage.setItem(key, JSON.stringify(value));
    },
    remove(key) {
      localStorage.removeItem(key);
    },
  };

  // -- state ---------------------------------------------------------------------------------------
  let chats = store.get(KEYS.chats, []); // newest first: {id, title, updated, messages: [{role, content, ...}]}
  let current = chats.find((c) => c.id === store.get(KEYS.current, null)) || null; // null: a new, unsaved chat
  let generation = null; // {controller, chat, message} while a reply streams
  let model = { name: null, context: null };

  class AuthError extends Error {}

  // -- persistence ---------------------------------------------------------------------------------
  function saveChats() {
    chats.sort((a, b) => b.updated - a.updated);
    chats.length = Math.min(chats.length, MAX_CHATS);
    for (;;) {
      try {
        store.set(KEYS.chats, chats);
        break;
      } catch (e) {
        if (chats.length <= 1) break; // storage full even for one chat: keep it in memory only
        chats.pop(); // the oldest goes first
      }
    }
    try {
      store.set(KEYS.current, current ? current.id : null);
    } catch {
      // storage full: the page still works, the selection is just not remembered
    }
  }

  function readSettings() {
    return {
      system: $("system-prompt").value,
      temperature: $("temperature").value,
      maxTokens: $("max-tokens").value,
      seed: $("seed").value,
    };
  }

  function loadSettings() {
    const s = { ...DEFAULT_SETTINGS, ...store.get(KEYS.settings, {}) };
    $("system-prompt").value = s.system;
    $("temperature").value = s.temperature;
    $("max-tokens").value = s.maxTokens;
    $("seed").value = s.seed;
  }

  // -- server --------------------------------------------------------------------------------------
  function authHeaders() {
    const key = store.get(KEYS.apiKey, "");
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function errorMessage(resp) {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
    } catch {
      // not JSON (a proxy's error page, say): show the status instead
    }
    return `HTTP ${resp.status} ${resp.statusText}`.trim() + (text && text.length < 300 ? `: ${text}` : "");
  }

  // fetch with the saved key; on 401 ask for a key and try again, until it works or the user cancels.
  async function apiFetch(path, init = {}) {
    for (;;) {
      const resp = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
      if (resp.status !== 401) return resp;
      const reason = await errorMessage(resp);
      const hadKey = Boolean(store.get(KEYS.apiKey, ""));
      if (!(await askForKey(hadKey ? `The server refused the key: ${reason}` : null))) throw new AuthError(reason);
    }
  }

  async function loadModel() {
    const label = $("model-name");
    label.classList.remove("problem");
    label.textContent = "connecting…";
    try {
      const resp = await apiFetch("v1/models");
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const card = (await resp.json()).data[0];
      model = { name: card.id, context: card.max_model_len || null };
      label.textContent = model.name;
      $("model-context").textContent = model.context ? `${model.context.toLocaleString("en-US")} tokens context` : "";
    } catch (e) {
      label.textContent = e instanceof AuthError ? "API key needed (click to enter)" : `server unreachable: ${e.message}`;
      label.classList.add("problem");
    }
    updateKeyButton();
  }

  // -- API key dialog ------------------------------------------------------------------------------
  let keyPrompt = null; // the pending dialog's promise, shared by concurrent callers

  function askForKey(error) {
    if (keyPrompt) return keyPrompt;
    const dialog = $("key-dialog");
    const input = $("api-key");
    $("key-error").hidden = !error;
    $("key-error").textContent = error || "";
    input.value = "";
    keyPrompt = new Promise((resolve) => {
      const finish = (saved) => {
        dialog.removeEventListener("close", onClose);
        $("key-form").removeEventListener("submit", onSubmit);
        $("key-cancel").removeEventListener("click", onCancel);
        if (dialog.open) dialog.close();
        keyPrompt = null;
        updateKeyButton();
        resolve(saved);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        store.set(KEYS.apiKey, key);
        finish(true);
      };
      const onCancel = () => finish(false);
      // Escape closes the dialog; a close event left over from an earlier, already finished prompt finds it open.
      const onClose = () => {
        if (!dialog.open) finish(false);
      };
      dialog.addEventListener("close", onClose);
      $("key-form").addEventListener("submit", onSubmit);
      $("key-cancel").addEventListener("click", onCancel);
    });
    dialog.showModal();
    input.focus();
    return keyPrompt;
  }

  function updateKeyButton() {
    $("forget-key").hidden = !store.get(KEYS.apiKey, "");
  }

  // -- rendering -----------------------------------------------------------------------------------
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.getAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  function markdownToSafeHtml(text) {
    return DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: false }));
  }

  function statsLine(message) {
    const s = message.stats;
    const parts = [];
    if (s) {
      if (s.tokens) parts.push(`${s.estimated ? "~" : ""}${s.tokens} tokens`);
      if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
      if (s.ttftMs != null) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
    }
    if (message.stopped) parts.push("stopped");
    else if (message.finishReason === "length") parts.push("max tokens reached");
    return parts.join(" · ");
  }

  function messageView(message) {
    const el = document.createElement("div");
    el.className = `message ${message.role}`;
    if (message.role === "user") {
      el.textContent = message.content; // what the user typed is shown as typed, never as HTML
      return el;
    }
    const content = document.createElement("div");
    content.className = "content";
    const error = document.createElement("div");
    error.className = "error";
    const stats = document.createElement("div");
    stats.className = "stats";
    el.append(content, error, stats);
    let scheduled = false;
    const update = () => {
      scheduled = false;
      content.innerHTML = markdownToSafeHtml(message.content);
      error.hidden = !message.error;
      error.textContent = message.error || "";
      stats.textContent = statsLine(message);
      stats.hidden = !stats.textContent;
      el.classList.toggle("pending", generation !== null && generation.message === message);
    };
    update();
    // Streaming re-renders at most once per frame, however fast chunks arrive.
    el.refresh = (now = false) => {
      if (now) return update();
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(update);
      }
    };
    return el;
  }

  function renderChatList() {
    const list = $("chat-list");
    list.replaceChildren();
    if (!chats.length) {
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.textContent = "Conversations you start are kept in this browser.";
      list.append(hint);
    }
    for (const chat of chats) {
      const item = document.createElement("div");
      item.className = "chat-item" + (chat === current ? " current" : "");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = chat.title;
      open.title = chat.title;
      open.addEventListener("click", () => openChat(chat));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.textContent = "×";
      del.setAttribute("aria-label", `Delete "${chat.title}"`);
      del.addEventListener("click", () => deleteChat(chat));
      item.append(open, del);
      list.append(item);
    }
  }

  function renderMessages() {
    const box = $("messages");
    box.replaceChildren(...(current ? current.messages.map(messageView) : []));
    $("empty").hidden = Boolean(current && current.messages.length);
    scrollToBottom(true);
  }

  function scrollToBottom(force = false) {
    const scroller = $("scroller");
    // Follow the stream only if the reader has not scrolled up to read something.
    if (force || scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80) {
      scroller.scrollTop = scroller.scrollHeight;
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  // -- conversations -------------------------------------------------------------------------------
  function openChat(chat) {
    stopGeneration();
    current = chat;
    saveChats();
    renderChatList();
    renderMessages();
    closeSidebar();
    $("prompt").focus();
  }

  function newChat() {
    openChat(null);
  }

  function deleteChat(chat) {
    if (generation && generation.chat === chat) stopGeneration();
    chats = chats.filter((c) => c !== chat);
    if (current === chat) current = null;
    saveChats();
    renderChatList();
    renderMessages();
  }

  function stopGeneration() {
    if (generation) generation.controller.abort();
  }

  // The messages the server sees: the system prompt, then every turn that has text and no error.
  function apiMessages(chat, system) {
    const turns = chat.messages
      .filter((m) => m.content && !m.error)
      .map((m) => ({ role: m.role, content: m.content }));
    return system.trim() ? [{ role: "system", content: system }, ...turns] : turns;
  }

  function requestBody(chat, settings) {
    const body = {
      model: model.name || "default",
      messages: apiMessages(chat, settings.system),
      stream: true,
      stream_options: { include_usage: true },
    };
    // Empty fields are left to the server's defaults; the server checks the values and says what is wrong.
    if (settings.temperature !== "") body.temperature = Number(settings.temperature);
    if (settings.maxTokens !== "") body.max_tokens = Number(settings.maxTokens);
    if (settings.seed !== "") body.seed = Number(settings.seed);
    return body;
  }

  async function send(text) {
    if (generation || !text.trim()) return;
    if (!current) {
      current = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: text.trim().slice(0, 60),
                  updated: Date.now(), messages: [] };
      chats.unshift(current);
    }
    const chat = current;
    chat.messages.push({ role: "user", content: text });
    const body = requestBody(chat, readSettings());
    const message = { role: "assistant", content: "" };
    chat.messages.push(message);
    chat.updated = Date.now();
    generation = { controller: new AbortController(), chat, message };
    saveChats();
    renderChatList();
    renderMessages();
    setBusy(true);
    const view = $("messages").lastElementChild;
    try {
      await streamReply(body, message, generation.controller.signal, () => {
        if (current === chat) {
          view.refresh();
          scrollToBottom();
        }
      });
    } finally {
      generation = null;
      chat.updated = Date.now();
      saveChats();
      setBusy(false);
      if (current === chat) {
        view.refresh(true);
        scrollToBottom();
      }
    }
  }

  // POST the request and read its server-sent events into `message`, timing the reply as it comes.
  async function streamReply(body, message, signal, onUpdate) {
    const started = performance.now();
    let firstAt = null;
    let lastAt = null;
    let chunks = 0;
    let usage = null;
    try {
      const resp = await apiFetch("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the server failed the request");
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const text = choice.delta && choice.delta.content;
          if (text) {
            const now = performance.now();
            if (firstAt === null) firstAt = now;
            lastAt = now;
            chunks += 1;
            message.content += text;
            onUpdate();
          }
          if (choice.finish_reason) message.finishReason = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") message.stopped = true;
      else if (e instanceof AuthError) message.error = `the server needs an API key: ${e.message}`;
      else message.error = e.message || String(e);
    }
    // Without a usage chunk (stopped early) the count is of chunks, which is at most the token count.
    const tokens = usage ? usage.completion_tokens : chunks;
    const decodeSeconds = firstAt !== null && lastAt > firstAt ? (lastAt - firstAt) / 1000 : 0;
    message.stats = {
      tokens,
      estimated: !usage,
      ttftMs: firstAt === null ? null : firstAt - started,
      // Decode speed: tokens after the first, over the time since the first arrived.
      tokensPerSecond: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
    };
  }

  // -- layout --------------------------------------------------------------------------------------
  function closeSidebar() {
    document.body.classList.remove("sidebar-open");
    $("scrim").hidden = true;
    $("menu").setAttribute("aria-expanded", "false");
  }

  function toggleSidebar() {
    const open = !document.body.classList.contains("sidebar-open");
    document.body.classList.toggle("sidebar-open", open);
    $("scrim").hidden = !open;
    $("menu").setAttribute("aria-expanded", String(open));
  }

  function growPrompt() {
    const prompt = $("prompt");
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight + 2, 200)}px`;
  }

  // -- wiring --------------------------------------------------------------------------------------
  function submitPrompt() {
    const prompt = $("prompt");
    if (generation || !prompt.value.trim()) return;
    const text = prompt.value;
    prompt.value = "";
    growPrompt();
    send(text);
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submitPrompt();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submitPrompt();
    }
  });
  $("prompt").addEventListener("input", growPrompt);
  $("stop").addEventListener("click", stopGeneration);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && generation && !$("key-dialog").open) stopGeneration();
  });
  $("new-chat").addEventListener("click", newChat);
  $("menu").addEventListener("click", toggleSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("model-name").addEventListener("click", () => {
    if ($("model-name").classList.contains("problem")) loadModel();
  });
  $("forget-key").addEventListener("click", () => {
    store.remove(KEYS.apiKey);
    loadModel();
  });
  for (const id of ["system-prompt", "temperature", "max-tokens", "seed"]) {
    $(id).addEventListener("input", () => {
      try {
        store.set(KEYS.settings, readSettings());
      } catch {
        // storage full: the settings apply to this page, they are just not remembered
      }
    });
  }

  window.addEventListener("resize", growPrompt); // the placeholder may wrap differently

  loadSettings();
  growPrompt();
  renderChatList();
  renderMessages();
  loadModel();
  $("prompt").focus();
})();
