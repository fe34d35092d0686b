"use strict";
// The report's behaviour: sortable tables and, per section, the pair explorer. Every string from the data is put on
// the page with textContent (never as markup).
(function () {
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // --- sortable tables -----------------------------------------------------------------------------------------
  function sortable(table) {
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach(function (th, column) {
      th.addEventListener("click", function () {
        const descending = th.getAttribute("aria-sort") === "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        const key = function (row) {
          const cell = row.cells[column];
          const value = cell.dataset.sort;
          return value === "" || value === undefined ? null : Number(value);
        };
        rows.sort(function (a, b) {
          const x = key(a), y = key(b);
          let order;
          if (x !== null && y !== null) order = x - y;
          else if (x === null && y === null) order = a.cells[column].textContent.localeCompare(b.cells[column].textContent);
          else return x === null ? 1 : -1; // empty cells last, either way
          return descending ? -order : order;
        });
        rows.forEach(function (row) { body.append(row); });
      });
    });
  }
  document.querySelectorAll("table.sortable").forEach(sortable);

  // --- the pair explorer -----------------------------------------------------------------------------------------
  const SHOW = 300; // rows drawn at once (more with "show more")

  function fmt(x) { return x.toFixed(4); }

  function commonPrefix(a, b) {
    const n = Math.min(a.length, b.length);
    let i = 0;
    while (i < n && a[i] === b[i]) i++;
    return i;
  }

  function chain(text, cut, kind) {
    // the chain as text, from the first differing character on in a .tail span, that character in a <mark>
    const pre = el("pre", { class: "chain " + kind });
    if (cut === null) { pre.textContent = text; return pre; }
    pre.append(document.createTextNode(text.slice(0, cut)));
    const tail = el("span", { class: "tail" });
    const first = text.slice(cut, cut + 1);
    tail.append(el("mark", { text: first === "" ? "∎" : first, title: "first difference" }));
    tail.append(document.createTextNode(text.slice(cut + 1)));
    pre.append(tail);
    return pre;
  }

  function explorer(root) {
    const data = JSON.parse(document.getElementById(root.dataset.pairs).textContent);
    const str = function (i) { return i === null || i === undefined ? null : data.strings[i]; };
    const state = { run: 0, filter: "all", sort: "diff", search: "", shown: SHOW, selected: null };

    const runSelect = el("select", { class: "run", "aria-label": "run" });
    data.runs.forEach(function (run, i) {
      runSelect.append(el("option", { value: String(i), text: run.label + " — " + run.flips + " flips, " +
        run.forced + " forced, " + run.differ + " chains differ, of " + run.total }));
    });
    const filters = el("span", { class: "filters", role: "radiogroup" });
    [["all", "all pairs"], ["flips", "flips"], ["forced", "forced"], ["differ", "chains that differ"]].forEach(
      function (f) {
        const input = el("input", { type: "radio", name: root.dataset.pairs + "-filter", value: f[0] });
        if (f[0] === "all") input.checked = true;
        input.addEventListener("change", function () { state.filter = f[0]; state.shown = SHOW; draw(); });
        filters.append(el("label", {}, [input, f[1]]));
      });
    const sortSelect = el("select", { class: "sort", "aria-label": "sort" });
    [["diff", "largest |Δscore| first"], ["divergence", "earliest divergence first"], ["id", "qid, docid"]].forEach(
      function (s) { sortSelect.append(el("option", { value: s[0], text: s[1] })); });
    const search = el("input", { type: "search", class: "search", placeholder: "qid or docid contains…" });
    const count = el("span", { class: "count" });
    root.append(el("div", { class: "controls" }, [el("label", {}, ["Run ", runSelect]), filters,
      el("label", {}, ["Sort ", sortSelect]), search, count]));

    const tbody = el("tbody");
    const head = el("tr", {}, ["qid", "docid", data.reference + " score", "run score", "|Δscore|", "tokens",
      "divergence (" + data.unit + ")", ""].map(function (t) { return el("th", { scope: "col", text: t }); }));
    const more = el("button", { type: "button", class: "more", text: "show more" });
    root.append(el("div", { class: "list" }, [el("table", { class: "pairs" }, [el("thead", {}, [head]), tbody])]));
    root.append(more);
    const detail = el("div", { class: "detail", "aria-live": "polite" },
      [el("p", { class: "empty", text: "Pick a pair to see both reasoning chains." })]);
    root.append(detail);

    runSelect.addEventListener("change", function () {
      state.run = Number(runSelect.value); state.shown = SHOW; state.selected = null; draw(); show(null);
    });
    sortSelect.addEventListener("change", function () { state.sort = sortSelect.value; draw(); });
    search.addEventListener("input", function () { state.search = search.value.trim(); state.shown = SHOW; draw(); });
    more.addEventListener("click", function () { state.shown += SHOW; draw(); });

    function keep(p) {
      const flip = (p.a > 0.5) !== (p.b > 0.5);
      if (state.filter === "flips" && !flip) return false;
      if (state.filter === "forced" && !(p.fa || p.fb)) return false;
      if (state.filter === "differ" && p.v === null) return false;
      return !state.search || p.q.includes(state.search) || p.d.includes(state.search);
    }

    function draw() {
      const run = data.runs[state.run];
      const pairs = run.pairs.filter(keep);
      const by = {
        diff: function (x, y) { return Math.abs(y.b - y.a) - Math.abs(x.b - x.a); },
        divergence: function (x, y) {
          return (x.v === null ? Infinity : x.v) - (y.v === null ? Infinity : y.v) ||
            Math.abs(y.b - y.a) - Math.abs(x.b - x.a);
        },
        id: function (x, y) { return x.q.localeCompare(y.q) || x.d.localeCompare(y.d); },
      }[state.sort];
      pairs.sort(by);
      tbody.replaceChildren();
      pairs.slice(0, state.shown).forEach(function (p) {
        const flip = (p.a > 0.5) !== (p.b > 0.5);
        const tags = el("td");
        if (flip) tags.append(el("span", { class: "tag flip", text: "flip" }));
        if (p.fa || p.fb) tags.append(el("span", { class: "tag forced", text: "forced" }));
        if (p.v !== null) tags.append(el("span", { class: "tag differs", text: "chain differs" }));
        const row = el("tr", { "data-qid": p.q, "data-docid": p.d, class: flip ? "flipped" : "" }, [
          el("td", { text: p.q }), el("td", { text: p.d }), el("td", { text: fmt(p.a) }), el("td", { text: fmt(p.b) }),
          el("td", { text: fmt(Math.abs(p.b - p.a)) }), el("td", { text: p.ta + " → " + p.tb }),
          el("td", { text: p.v === null ? "same" : String(p.v) }), tags]);
        if (state.selected === p) row.classList.add("selected");
        row.addEventListener("click", function () {
          state.selected = p;
          tbody.querySelectorAll("tr.selected").forEach(function (r) { r.classList.remove("selected"); });
          row.classList.add("selected");
          show(p);
        });
        tbody.append(row);
      });
      more.hidden = pairs.length <= state.shown;
      let text = pairs.length + " of " + run.total + " pairs";
      if (run.pairs.length < run.total) {
        text += " (" + run.pairs.length + " listed in this file: every flip, forced answer and differing chain " +
          "first, then by |Δscore|)";
      }
      count.textContent = text;
    }

    function side(kind, title, score, tokens, forced, text, cut) {
      const facts = el("dl");
      [["score", fmt(score)], ["P(true), P(false)", fmt(score) + ", " + fmt(1 - score)],
        ["tokens", String(tokens)], ["forced", forced ? "yes: the budget ran out, the answer was forced" : "no"]]
        .forEach(function (f) { facts.append(el("dt", { text: f[0] }), el("dd", { text: f[1] })); });
      return el("div", { class: "side " + kind }, [el("h4", { text: title }), facts, chain(text, cut, kind)]);
    }

    function show(p) {
      if (p === null) {
        detail.replaceChildren(el("p", { class: "empty", text: "Pick a pair to see both reasoning chains." }));
        return;
      }
      const run = data.runs[state.run];
      const a = str(p.ra), b = str(p.rb);
      const cut = a === b ? null : commonPrefix(a, b);
      const parts = [el("h4", { text: "Query " + p.q + ", document " + p.d })];
      const query = str(data.queries[p.q]);
      if (query !== null) parts.push(el("p", { class: "query" }, [el("strong", { text: "Query: " }), query]));
      const passage = str(p.p);
      if (passage !== null) {
        parts.push(el("details", {}, [el("summary", { text: "Passage" }), el("p", { class: "passage", text: passage })]));
      }
      parts.push(el("p", { class: "divergence", text: cut === null ? "The two chains are the same." :
        "The chains first differ at " + data.unit.replace(/s$/, "") + " " + p.v + " (character " + cut +
        "); marked from there on." }));
      parts.push(el("div", { class: "sides" }, [
        side("reference", "Reference: " + data.reference, p.a, p.ta, p.fa, a, cut),
        side("run", run.label, p.b, p.tb, p.fb, b, cut)]));
      detail.replaceChildren.apply(detail, parts);
    }

    draw();
  }
  document.querySelectorAll(".explorer").forEach(explorer);
})();
