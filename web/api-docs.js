// Renders /openapi.json as a readable page: the routes by tag, with their parameters and
// answers. Text goes in through textContent only.
"use strict";
(async function () {
  const el = (name, attrs, ...children) => {
    const node = document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children) node.append(child);
    return node;
  };
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("api-summary").textContent = spec.info.description;
  const root = document.getElementById("api");
  const resolve = (p) => (p.$ref ? p.$ref.split("/").reduce((o, k) => (k === "#" ? spec : o[k]), null) : p);
  for (const tag of spec.tags) {
    root.append(el("h2", { id: `tag-${tag.name}` }, tag.description));
    const grid = el("div", { class: "grid" });
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(item)) {
        if (!op.tags || !op.tags.includes(tag.name)) continue;
        const card = el("section", { class: "card wide operation" },
          el("h3", {}, el("code", {}, `${method.toUpperCase()} ${path}`)),
          el("div", {}, op.summary));
        if (op.description) card.append(el("p", { class: "note" }, op.description));
        const params = (op.parameters || []).map(resolve);
        if (params.length) {
          const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "about")));
          for (const p of params) table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, p.description || "")));
          card.append(table);
        }
        const answers = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "meaning")));
        for (const [code, r] of Object.entries(op.responses || {})) answers.append(el("tr", {}, el("td", {}, code), el("td", {}, r.description)));
        card.append(answers);
        grid.append(card);
      }
    }
    root.append(grid);
  }
})();
