// Small SVG charts for the server's pages (no library, nothing fetched from elsewhere).
"use strict";
window.hyphaCharts = {
  // Bars for `points` ([{label, value, bad}]) into the <svg> `svg`; `unit` follows the peak value.
  bars(svg, points, unit) {
    const ns = "http://www.w3.org/2000/svg";
    const width = 600, height = 120, left = 34, bottom = 16, top = 8;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.replaceChildren();
    const add = (name, attrs, text) => {
      const el = document.createElementNS(ns, name);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
      if (text !== undefined) el.textContent = text;
      svg.appendChild(el);
      return el;
    };
    const peak = Math.max(1, ...points.map((p) => p.value || 0));
    const plot = height - bottom - top;
    add("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom });
    add("text", { x: 2, y: top + 8 }, `${Math.round(peak * 10) / 10}${unit || ""}`);
    add("text", { x: 2, y: height - bottom }, "0");
    const slot = (width - left) / Math.max(points.length, 1);
    points.forEach((p, i) => {
      const h = p.bad ? plot : Math.max(p.value ? 1 : 0, (p.value / peak) * plot);
      const bar = add("rect", {
        class: p.bad ? "bar bad" : "bar", x: left + i * slot + slot * 0.15, y: height - bottom - h,
        width: Math.max(1, slot * 0.7), height: h,
      });
      const title = document.createElementNS(ns, "title");
      title.textContent = `${p.label}: ${p.bad ? p.bad : (p.value ?? 0) + (unit || "")}`;
      bar.appendChild(title);
    });
    if (points.length) {
      add("text", { x: left, y: height - 3 }, points[0].label);
      add("text", { x: width - 4, y: height - 3, "text-anchor": "end" }, points[points.length - 1].label);
    }
  },
};
