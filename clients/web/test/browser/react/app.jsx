// A tiny React page on the built package: a list rendered by useQuery.
import { createElement as h } from "react";
import { createRoot } from "react-dom/client";
import { connect } from "../../../dist/index.js";
import { useQuery } from "../../../dist/react.js";

window.renders = 0;

function List({ db }) {
  const { rows, loading, error } = useQuery(db, "SELECT id, title FROM todos ORDER BY id");
  window.renders++;
  if (error) return h("p", { id: "error" }, error.message);
  return h("ul", { id: "list", "data-loading": String(loading) }, rows.map((r) => h("li", { key: String(r.id) }, r.title)));
}

window.start = async (url) => {
  window.db = await connect({ url, name: "react", workerUrl: "/dist/worker.js" });
  createRoot(document.getElementById("root")).render(h(List, { db: window.db }));
};
