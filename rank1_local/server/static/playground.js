"use strict";
// The playground: what the server serves (GET /v1/models), then a rerank request whose results arrive as server-sent
// events (POST /v1/rerank with "stream": true, read with fetch: EventSource cannot POST). Every string from the server
// is put on the page with textContent. The API key lives in `apiKey` only: never in a URL, never stored.
(function () {
  const $ = function (id) { return document.getElementById(id); };
  let apiKey = "";
  let running = null; // the AbortController of the request in flight
  let served = null; // the model's protocol settings, as /v1/models gives them

  function headers() {
    const out = { "Content-Type": "application/json" };
    if (apiKey) out.Authorization = "Bearer " + apiKey;
    return out;
  }

  function status(id, text, kind) {
    const node = $(id);
    node.textContent = text;
    node.className = "status" + (kind ? " " + kind : "");
  }

  async function message(response) {
    try {
      const body = await response.json();
      return body.message || body.detail || response.statusText;
    } catch (e) {
      return response.statusText || "HTTP " + response.status;
    }
  }

  function protocolWords(p) {
    const prompt = p.prompt_template ? ", a dataset prompt" : ", no dataset prompt";
    return p.protocol + ", reasoning budget " + p.max_think_tokens + " tokens, context " + p.n_ctx + ", " +
      p.rethink_rounds + " rethink rounds" + prompt;
  }

  async function loadModels() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers(), cache: "no-store" });
    } catch (e) {
      status("server-status", "The server does not answer: " + e.message, "error");
      return;
    }
    if (response.status === 401) {
      $("key-box").classList.add("needed");
      status("server-status", "This server needs an API key: type it under API key.", "error");
      return;
    }
    if (!response.ok) {
      status("server-status", "GET /v1/models: " + (await message(response)), "error");
      return;
    }
    const model = (await response.json()).data[0];
    served = model.meta.protocol;
    $("key-box").classList.remove("needed");
    $("model-name").textContent = model.id;
    $("model-file").textContent = model.meta.file;
    $("model-backend").textContent = model.meta.backend;
    $("model-device").textContent = model.meta.device + " (" + model.meta.slots + " slot" +
      (model.meta.slots === 1 ? ")" : "s)");
    $("model-protocol").textContent = protocolWords(served);
    $("max-think-tokens").placeholder = String(served.max_think_tokens);
    $("rethink-rounds").placeholder = String(served.rethink_rounds);
    $("protocol").value = served.protocol;
    status("server-status", "", "");
  }

  function request(query, documents) {
    const body = { query: query, documents: documents, stream: true };
    const budget = $("max-think-tokens").value.trim();
    if (budget) body.max_think_tokens = Number(budget);
    const rethink = $("rethink-rounds").value.trim();
    if (rethink) body.rethink_rounds = Number(rethink);
    if (!served || $("protocol").value !== served.protocol) body.protocol = $("protocol").value;
    const dataset = $("dataset").value.trim();
    if (dataset) body.dataset = dataset;
    const instruction = $("instruction").value.trim();
    if (instruction) body.instruction = instruction;
    return body;
  }

  function card(index, text) {
    const node = document.createElement("article");
    node.className = "doc waiting";
    node.dataset.index = String(index);
    const title = document.createElement("h3");
    title.textContent = "Document " + (index + 1);
    const quote = document.createElement("p");
    quote.className = "text";
    quote.textContent = text;
    const state = document.createElement("p");
    state.className = "state";
    state.textContent = "waiting for a slot…";
    const reasoning = document.createElement("pre");
    reasoning.className = "reasoning";
    node.append(title, quote, state, reasoning);
    return node;
  }

  function showResult(row) {
    const node = document.querySelector('#documents-out .doc[data-index="' + row.index + '"]');
    if (!node) return;
    node.classList.remove("waiting");
    node.classList.add(row.relevance_score > 0.5 ? "relevant" : "not-relevant");
    const flags = [];
    if (row.forced) flags.push("forced: the budget ran out");
    if (row.truncated) flags.push("passage cut to fit");
    if (row.too_long) flags.push("too long for the context: not scored");
    if (row.cached) flags.push("from the cache");
    node.querySelector(".state").textContent = "score " + row.relevance_score.toFixed(4) + " · " + row.n_tokens +
      " tokens · done at " + row.seconds.toFixed(2) + " s" + (flags.length ? " · " + flags.join(", ") : "");
    node.querySelector(".reasoning").textContent = row.reasoning;
  }

  function showRanking(answer, documents) {
    const list = $("ranking");
    list.replaceChildren();
    answer.results.forEach(function (row) {
      const item = document.createElement("li");
      item.dataset.index = String(row.index);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = row.relevance_score.toFixed(4);
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = "Document " + (row.index + 1) + ": " + documents[row.index];
      item.append(score, text);
      list.append(item);
    });
  }

  // one server-sent event: {event, data}; comments (": waiting") are heartbeats
  function parseEvent(block) {
    let event = "message";
    const data = [];
    block.split("\n").forEach(function (line) {
      if (line.startsWith(":")) return;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    });
    return data.length ? { event: event, data: JSON.parse(data.join("\n")) } : null;
  }

  async function rerank(event) {
    event.preventDefault();
    apiKey = $("api-key").value;
    const query = $("query").value.trim();
    const documents = $("documents").value.split("\n").map(function (d) { return d.trim(); })
      .filter(function (d) { return d; });
    if (!query || !documents.length) {
      status("run-status", "Type a query and at least one document.", "error");
      return;
    }
    $("results").hidden = false;
    $("ranking").replaceChildren();
    $("documents-out").replaceChildren.apply($("documents-out"), documents.map(function (d, i) { return card(i, d); }));
    running = new AbortController();
    $("submit").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    let finished = 0;
    status("run-status", "scoring " + documents.length + " documents…", "busy");
    try {
      const response = await fetch("/v1/rerank", { method: "POST", headers: headers(), signal: running.signal,
        body: JSON.stringify(request(query, documents)) });
      if (!response.ok) {
        if (response.status === 401) $("key-box").classList.add("needed");
        status("run-status", "HTTP " + response.status + ": " + (await message(response)), "error");
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const parsed = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (parsed === null) continue;
          if (parsed.event === "result") {
            showResult(parsed.data);
            finished += 1;
            status("run-status", finished + " of " + documents.length + " documents scored…", "busy");
          } else if (parsed.event === "done") {
            showRanking(parsed.data, documents);
            const seconds = ((performance.now() - started) / 1000).toFixed(1);
            status("run-status", "done: " + documents.length + " documents in " + seconds + " s", "done");
          } else if (parsed.event === "error") {
            status("run-status", parsed.data.message, "error");
          }
        }
      }
    } catch (e) {
      status("run-status", e.name === "AbortError" ? "stopped: the server dropped what was left" :
        "the request failed: " + e.message, "error");
    } finally {
      running = null;
      $("submit").disabled = false;
      $("stop").disabled = true;
    }
  }

  $("rerank-form").addEventListener("submit", rerank);
  $("stop").addEventListener("click", function () { if (running) running.abort(); });
  $("use-key").addEventListener("click", function () { apiKey = $("api-key").value; loadModels(); });
  loadModels();
})();
