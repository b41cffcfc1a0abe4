// netboot dashboard: live rows from /api/v1/events, and the power and deploy buttons.
// Plain JavaScript, no build step. The operator token is asked for once and kept in
// sessionStorage (this tab only); it is sent as a bearer token, never put in a URL.
(function () {
  "use strict";
  var live = document.getElementById("live");

  function setText(el, text, cls) {
    if (!el) return;
    el.textContent = text;
    if (cls) el.className = cls;
  }

  function nodeRow(uuid) {
    return document.getElementById("node-" + uuid);
  }

  // The list shows one page: a node it does not show is counted, never fetched (a flood
  // of new nodes must not turn every open tab into a reload loop).
  var fresh = document.getElementById("fresh");
  var freshCount = 0;

  function notice(text) {
    if (!fresh) return;
    setText(document.getElementById("fresh-text"), text);
    fresh.hidden = false;
  }

  function onNode(d) {
    var row = nodeRow(d.uuid);
    if (!row) {  // a node this page does not show
      if (d.event === "discovered") {
        freshCount += 1;
        notice(freshCount + (freshCount === 1 ? " new node" : " new nodes") +
               " since this page was loaded.");
      }
      return;
    }
    row.setAttribute("data-state", d.state);
    var cell = row.querySelector(".state-cell .state");
    setText(cell, d.state, "state state-" + d.state);
    if (d.event === "stuck") row.classList.add("stuck");
    else if (d.state !== "deploying" && d.state !== "commissioning") row.classList.remove("stuck");
  }

  function onPower(d) {
    var row = nodeRow(d.uuid);
    if (!row) return;
    var cell = row.querySelector(".power-cell .power");
    var label = cell && cell.textContent.indexOf("power") === 0 ? "power " + d.state : d.state;
    setText(cell, label, "power power-" + d.state);
    if (cell) cell.title = d.reason || "";
  }

  if (window.EventSource) {
    var es = new EventSource("/api/v1/events");
    es.addEventListener("node", function (e) { onNode(JSON.parse(e.data)); });
    es.addEventListener("power", function (e) { onPower(JSON.parse(e.data)); });
    es.addEventListener("resync", function () {
      if (fresh) notice("Too many changes to follow live.");
      else location.reload();  // a node page: one node, cheap to fetch again
    });
    es.onopen = function () { setText(live, "nodes \u00b7 live"); };
    es.onerror = function () { setText(live, "nodes \u00b7 reconnecting\u2026"); };
  } else {
    setTimeout(function () { location.reload(); }, 10000);
  }

  // -- actions (node page) -----------------------------------------------------------
  var actions = document.getElementById("actions");
  if (!actions) return;
  var uuid = actions.getAttribute("data-uuid");
  var result = document.getElementById("action-result");

  function token() {
    var t = sessionStorage.getItem("netboot-token");
    if (!t) {
      t = prompt("Operator token (api.tokens or api.admin_token in netboot.yaml):");
      if (t) sessionStorage.setItem("netboot-token", t);
    }
    return t;
  }

  function call(path, body, what) {
    var t = token();
    if (!t) return;
    setText(result, what + "\u2026", "muted");
    fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
                                           "Authorization": "Bearer " + t},
                 body: JSON.stringify(body)})
      .then(function (r) {
        return r.json().then(function (j) { return [r.status, j]; });
      })
      .then(function (sj) {
        var status = sj[0], j = sj[1];
        if (status === 401) sessionStorage.removeItem("netboot-token");
        if (status >= 300) { setText(result, what + ": " + (j.error || status), "error-text"); return; }
        setText(result, what + ": done", "muted");
        if (j.power) onPower({uuid: uuid, state: j.power.state, reason: j.power.reason});
      })
      .catch(function (err) { setText(result, what + ": " + err, "error-text"); });
  }

  actions.addEventListener("click", function (e) {
    var b = e.target;
    if (b.tagName !== "BUTTON") return;
    if (b.hasAttribute("data-power")) {
      var action = b.getAttribute("data-power");
      if (!confirm("Power " + action + " this node?")) return;
      call("/api/v1/nodes/" + uuid + "/power", {action: action}, "power " + action);
    } else if (b.hasAttribute("data-deploy")) {
      var profile = document.getElementById("deploy-profile").value;
      if (!confirm("Deploy profile " + profile + " on this node? It boots from the network now."))
        return;
      call("/api/v1/nodes/" + uuid + "/deploy", {profile: profile}, "deploy " + profile);
    }
  });
})();
