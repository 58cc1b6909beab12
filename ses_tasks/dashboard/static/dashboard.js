/* ses-tasks dashboard: live updates without reloading, and confirmations.
 * Polls the page's data-poll URL every second (while the tab is visible) and updates the
 * elements in place. Text goes in with textContent only, never as HTML. */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var main = document.getElementById("page");

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  }, true);

  if (!main || !main.getAttribute("data-poll")) { return; }
  var url = main.getAttribute("data-poll");
  var page = main.getAttribute("data-page");
  var root = main.getAttribute("data-root") || "";

  function setText(el, text) {
    text = String(text);
    if (el && el.textContent !== text) { el.textContent = text; }
  }
  function setProgress(el, percent) {
    if (el && String(el.value) !== String(percent)) { el.value = percent; el.textContent = percent + "%"; }
  }
  function pct(value, digits) { return (value * 100).toFixed(digits) + "%"; }

  function cell(cls, text) {
    var td = document.createElement("td");
    td.className = cls;
    if (text !== undefined) { td.textContent = text; }
    return td;
  }
  function newRow(c) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-campaign", c.id);
    var id = cell("id");
    var link = document.createElement("a");
    link.href = root + "/campaigns/" + encodeURIComponent(c.id);
    link.textContent = c.id;
    id.appendChild(link);
    tr.appendChild(id);
    tr.appendChild(cell("subject", ""));
    tr.appendChild(cell("state", ""));
    var prog = cell("progress-cell");
    var bar = document.createElement("progress");
    bar.className = "progress"; bar.max = 100; bar.value = 0;
    var span = document.createElement("span");
    span.className = "percent";
    prog.appendChild(bar); prog.appendChild(document.createTextNode(" ")); prog.appendChild(span);
    tr.appendChild(prog);
    ["sent", "rate", "eta", "weight", "profile"].forEach(function (k) { tr.appendChild(cell(k, "")); });
    return tr;
  }

  function updateRow(tr, c) {
    var state = tr.querySelector(".state");
    setText(state, c.state);
    if (state) { state.setAttribute("data-value", c.state); }
    setProgress(tr.querySelector("progress.progress"), c.percent);
    setText(tr.querySelector(".percent"), c.percent + "%");
    setText(tr.querySelector(".sent"), c.sent + "/" + c.total);
    setText(tr.querySelector(".rate"), c.rate_text);
    setText(tr.querySelector(".eta"), c.eta_text);
    setText(tr.querySelector(".weight"), c.weight);
    setText(tr.querySelector(".profile"), c.profile);
  }

  function updateList(data) {
    var body = document.querySelector("#campaigns tbody");
    if (!body) { return; }
    data.campaigns.slice().reverse().forEach(function (c) {
      var tr = null;
      body.querySelectorAll("tr[data-campaign]").forEach(function (row) {
        if (row.getAttribute("data-campaign") === c.id) { tr = row; }
      });
      if (!tr) {
        tr = newRow(c);
        body.insertBefore(tr, body.firstChild);
        var none = document.getElementById("no-campaigns");
        if (none) { none.remove(); }
      }
      updateRow(tr, c);
    });
  }

  function drawChart(chart) {
    var svg = document.getElementById("chart");
    if (!svg || !chart) { return; }
    var sent = svg.querySelector("polyline.sent");
    var failed = svg.querySelector("polyline.failed");
    if (sent) { sent.setAttribute("points", chart.sent_line); }
    if (failed) { failed.setAttribute("points", chart.failed_line); }
    setText(svg.querySelector(".y-max"), (Math.round(chart.y_max * 10) / 10) + "/s");
    setText(svg.querySelector(".t-start"), chart.start_label);
    setText(svg.querySelector(".t-end"), chart.end_label + " UTC");
    var group = svg.querySelector("g.points");
    if (!group) { return; }
    while (group.firstChild) { group.removeChild(group.firstChild); }
    chart.points.forEach(function (p) {
      var circle = document.createElementNS(SVG, "circle");
      circle.setAttribute("class", "point " + (p.series === "failed" ? "failed" : "sent"));
      circle.setAttribute("cx", Number(p.cx));
      circle.setAttribute("cy", Number(p.cy));
      circle.setAttribute("r", "2.5");
      var title = document.createElementNS(SVG, "title");
      title.textContent = p.label + " UTC: " + p.value + "/s " + p.series;
      circle.appendChild(title);
      group.appendChild(circle);
    });
  }

  function updateCampaign(c) {
    var state = document.getElementById("state");
    setText(state, c.state);
    if (state) { state.setAttribute("data-value", c.state); }
    setText(document.getElementById("reason"), c.reason);
    setProgress(document.getElementById("progress"), c.percent);
    setText(document.getElementById("percent"), c.percent + "%");
    setText(document.getElementById("final"), c.final);
    setText(document.getElementById("total"), c.total);
    setText(document.getElementById("rate"), c.rate_text);
    setText(document.getElementById("eta"), c.eta_text);
    Object.keys(c.counts).forEach(function (name) {
      document.querySelectorAll("#counts [data-state]").forEach(function (el) {
        if (el.getAttribute("data-state") === name) { setText(el, c.counts[name]); }
      });
    });
    setText(document.getElementById("bounce-rate"), pct(c.bounce_rate, 2));
    setText(document.getElementById("complaint-rate"), pct(c.complaint_rate, 3));
    var bm = document.getElementById("bounce-meter");
    if (bm) { bm.value = Math.min(c.bounce_rate, c.bounce_threshold); }
    var cm = document.getElementById("complaint-meter");
    if (cm) { cm.value = Math.min(c.complaint_rate, c.complaint_threshold); }
    setText(document.getElementById("hard-bounced"), c.hard_bounced);
    setText(document.getElementById("complained"), c.complained);
    setText(document.getElementById("failures-total"), c.failures_total);
    drawChart(c.chart);
  }

  function poll() {
    if (document.hidden) { window.setTimeout(poll, 1000); return; }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        if (page === "campaigns") { updateList(data); } else if (page === "campaign") { updateCampaign(data); }
        main.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(poll, 1000); });
  }
  window.setTimeout(poll, 1000);
})();
