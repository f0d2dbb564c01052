// The invitation link carries its code in the fragment (never sent to a
// server): put it into the form, and take it out of the address bar.
const token = decodeURIComponent(window.location.hash.slice(1));
const field = document.getElementById("token");
if (token && field && !field.value) {
  field.value = token;
  history.replaceState(null, "", window.location.pathname);
}
const form = document.getElementById("invite-form");
form?.addEventListener("submit", (event) => {
  const password = document.getElementById("password");
  const confirm = document.getElementById("confirm");
  if (password.value !== confirm.value) {
    event.preventDefault();
    confirm.setCustomValidity("The two passwords differ.");
    confirm.reportValidity();
  } else {
    confirm.setCustomValidity("");
  }
});
