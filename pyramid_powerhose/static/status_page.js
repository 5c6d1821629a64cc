// The status page: polls the stats every second, keeps the last minutes of
// points in the browser, and redraws the tables and the charts.
(function () {
  "use strict";
  var url = document.currentScript.getAttribute("data-stats");
  var KEEP = 300;  // points: five minutes at one a second
  var times = [], rate = [], queue = [], runP50 = [], runP99 = [];
  var ended = null, endedAt = null;  // jobs ended (all services) at the previous poll

  function chart(id, series) {
    var opts = {width: 420, height: 180, series: [{}].concat(series),
                axes: [{}, {size: 60}], legend: {show: true}};
    return new uPlot(opts, [[]].concat(series.map(function () { return []; })),
                     document.getElementById(id));
  }
  var charts = {
    rate: chart("chart-rate", [{label: "jobs/s", stroke: "#1f77b4"}]),
    queue: chart("chart-queue", [{label: "queued", stroke: "#d62728"}]),
    run: chart("chart-run", [{label: "p50", stroke: "#2ca02c"},
                             {label: "p99", stroke: "#ff7f0e"}])
  };

  function cell(row, value) {
    var td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "-" : value;
    row.appendChild(td);
  }

  function fill(id, rows) {
    var body = document.querySelector("#" + id + " tbody");
    body.textContent = "";
    rows.forEach(function (values) {
      var row = document.createElement("tr");
      values.forEach(function (value) { cell(row, value); });
      body.appendChild(row);
    });
  }

  function push(list, value) {
    list.push(value);
    if (list.length > KEEP) list.shift();
  }

  function update(stats) {
    document.getElementById("error").textContent = "";
    document.getElementById("broker").textContent =
      "broker pid " + stats.pid + " (" + stats.engine + "), up " + Math.round(stats.uptime) +
      " s, frontend " + stats.frontend + (stats.stopping ? ", STOPPING" : "");
    var names = Object.keys(stats.services).sort();
    var now = Date.now() / 1000, total = 0, totalQueue = 0, p50 = null, p99 = null;
    fill("services", names.map(function (name) {
      var s = stats.services[name], p = s.percentiles_ms;
      total += s.done + s.failed;
      totalQueue += s.queued;
      if (p.run_p50 !== null) { p50 = Math.max(p50 || 0, p.run_p50); }
      if (p.run_p99 !== null) { p99 = Math.max(p99 || 0, p.run_p99); }
      return [name, s.idle, s.busy, s.queued, s.jobs_per_second, p.wait_p50, p.wait_p99,
              p.run_p50, p.run_p99, s.done, s.failed];
    }));
    fill("workers", stats.workers.map(function (w) {
      var state = w.paused ? "paused" : w.holding ? w.holding + " job(s)" : "idle";
      return [w.address, w.pid, w.host, w.service, state, w.jobs, Math.round(w.age),
              w.last_job_ms];
    }));
    // jobs/s between two polls: the table's figure is over the last minute
    var rateNow = ended === null || total < ended ? 0 : (total - ended) / (now - endedAt);
    ended = total;
    endedAt = now;
    push(times, now);
    push(rate, Math.round(rateNow * 10) / 10);
    push(queue, totalQueue);
    push(runP50, p50);
    push(runP99, p99);
    charts.rate.setData([times, rate]);
    charts.queue.setData([times, queue]);
    charts.run.setData([times, runP50, runP99]);
    document.body.setAttribute("data-polls", times.length);
  }

  function poll() {
    fetch(url, {credentials: "same-origin"})
      .then(function (response) { return response.json(); })
      .then(function (stats) {
        if (stats.error) throw new Error(stats.error + ": " + stats.message);
        update(stats);
      })
      .catch(function (error) {
        document.getElementById("error").textContent = String(error);
      })
      .finally(function () { setTimeout(poll, 1000); });
  }
  poll();
})();
