// Progressive enhancement only: every page works without it. Pages marked
// data-refresh reload themselves every 10 s while visible and untouched.
(function () {
  var every = document.body.getAttribute("data-refresh");
  if (!every) return;
  var touched = false;
  document.addEventListener("input", function () { touched = true; });
  setInterval(function () {
    if (!touched && document.visibilityState === "visible") location.reload();
  }, Number(every) * 1000);
})();
