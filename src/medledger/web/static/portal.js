// medledger portal: progressive enhancement only; every page works without it.
"use strict";
document.documentElement.classList.add("js");

document.addEventListener("DOMContentLoaded", () => {
  // The add-a-record form shows only the fields of the chosen kind.
  const form = document.getElementById("new-record");
  if (form) {
    const update = () => {
      const chosen = form.querySelector('input[name="kind"]:checked');
      form.dataset.kind = chosen ? chosen.value : "lab";
    };
    form.addEventListener("change", update);
    update();
  }
  // Buttons that commit a transaction are disabled once pressed, so a double click does not
  // send the same request twice.
  for (const each of document.querySelectorAll("form[method='post']")) {
    each.addEventListener("submit", () => {
      for (const button of each.querySelectorAll("button[type='submit']")) {
        setTimeout(() => { button.disabled = true; }, 0);
      }
    });
  }
});
