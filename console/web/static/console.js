// The live queue: server-sent events from /events; each carries one alert's state and, when it belongs in
// this queue, its row as the server renders it. EventSource reconnects by itself with Last-Event-ID.
(function () {
  "use strict";
  function minutes(ms) { return Math.max(0, Math.round(ms / 60000)); }
  // under two minutes the seconds matter: "in 0 min" would read as "now"
  function span(ms) { return ms < 120000 ? Math.max(1, Math.round(ms / 1000)) + " s" : minutes(ms) + " min"; }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown[data-deadline]").forEach(function (el) {
      var left = Date.parse(el.dataset.deadline) - now;
      el.classList.toggle("overdue", left <= 0);
      el.textContent = left > 0 ? "next escalation in " + span(left) : "escalation due now";
    });
    document.querySelectorAll(".age[data-since]").forEach(function (el) {
      el.textContent = minutes(now - Date.parse(el.dataset.since)) + " min since result";
    });
  }
  setInterval(tick, 5000);
  tick();
  var list = document.getElementById("queue");
  if (!list || !window.EventSource) { return; }
  var live = document.getElementById("live");
  var empty = document.getElementById("empty");
  function before(a, b) {
    var ra = +a.dataset.rank, rb = +b.dataset.rank;
    if (ra !== rb) { return ra < rb; }
    return a.dataset.resultTime < b.dataset.resultTime;
  }
  function place(html, id) {
    var old = document.getElementById("alert-" + id);
    if (old) { old.remove(); }
    var holder = document.createElement("ul");
    holder.innerHTML = html.trim();
    var row = holder.firstElementChild;
    if (!old) { row.classList.add("fresh"); }
    var next = null;
    for (var i = 0; i < list.children.length; i++) {
      if (before(row, list.children[i])) { next = list.children[i]; break; }
    }
    list.insertBefore(row, next);
  }
  function apply(event) {
    var id = event.alert.alert_id;
    if (event.in_queue) { place(event.html, id); }
    else { var old = document.getElementById("alert-" + id); if (old) { old.remove(); } }
  }
  function refreshEmpty() { empty.hidden = list.children.length > 0; tick(); }
  var url = list.dataset.feed;
  if (list.dataset.lastEventId) { url += "&since=" + encodeURIComponent(list.dataset.lastEventId); }
  var source = new EventSource(url);
  source.addEventListener("open", function () { live.textContent = "live"; });
  source.addEventListener("error", function () { live.textContent = "reconnecting…"; });
  source.addEventListener("snapshot", function (e) {
    list.innerHTML = "";
    JSON.parse(e.data).forEach(apply);
    refreshEmpty();
  });
  source.addEventListener("alert", function (e) { apply(JSON.parse(e.data)); refreshEmpty(); });
  source.addEventListener("signed_out", function () { source.close(); window.location = "/login"; });
})();
