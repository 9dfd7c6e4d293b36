// oncely console: the committed-offsets chart (uPlot) with resets and undos
// marked on it. Data comes from a <script type="application/json"> element
// next to the chart; nothing here builds markup from data.
(function () {
  "use strict";
  var COLORS = ["#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#4e342e", "#37474f"];
  var MARK = { reset: "#b3261e", restore: "#ef6c00", undo: "#2e7d32" };

  function marksPlugin(marks) {
    return {
      hooks: {
        draw: function (u) {
          var ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
          ctx.save();
          ctx.font = (12 * devicePixelRatio) + "px system-ui, sans-serif";
          marks.forEach(function (m, i) {
            var x = u.valToPos(m.t, "x", true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
            ctx.strokeStyle = MARK[m.kind] || "#b3261e";
            ctx.fillStyle = ctx.strokeStyle;
            ctx.lineWidth = 2 * devicePixelRatio;
            ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
            ctx.fillText(m.label, x + 4 * devicePixelRatio, top + (14 + 14 * (i % 3)) * devicePixelRatio);
          });
          ctx.restore();
        }
      }
    };
  }

  function draw(el) {
    var src = document.getElementById(el.getAttribute("data-source"));
    if (!src || el.getAttribute("data-drawn") === "1") return;
    var data = JSON.parse(src.textContent);
    var xs = {};
    data.series.forEach(function (s) { s.points.forEach(function (p) { xs[p[0]] = true; }); });
    data.marks.forEach(function (m) { xs[m.t] = true; });
    var x = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    if (x.length === 0) { el.textContent = "No history yet: `oncely watch` records the offsets every 30 s."; return; }
    var cols = [x];
    var series = [{ label: "time" }];
    data.series.forEach(function (s, i) {
      var byX = {};
      s.points.forEach(function (p) { byX[p[0]] = p[1]; });
      cols.push(x.map(function (t) { return t in byX ? byX[t] : null; }));
      series.push({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
                    points: { show: true, size: 5 } });
    });
    var width = Math.max(400, Math.min(el.clientWidth || 900, 1300));
    el.setAttribute("data-drawn", "1");
    new uPlot({
      width: width, height: 280, series: series,
      axes: [{}, { label: "committed offset", size: 70 }],
      scales: { x: { time: true } },
      plugins: [marksPlugin(data.marks)]
    }, cols, el);
  }

  function drawAll() { document.querySelectorAll("[data-chart]").forEach(draw); }
  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSwap", drawAll);
})();
