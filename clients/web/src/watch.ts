//! Which replica tables a query reads, to re-run a watch only when one of
//! them changes: the known table names that appear in the SQL as words.
//! Over-inclusive at worst (a name inside a string literal), never blind:
//! a query naming no known table re-runs on every change.

export function tablesRead(sql: string, known: string[]): Set<string> {
  const found = new Set<string>();
  for (const qualified of known) {
    const name = qualified.startsWith("public.") ? qualified.slice(7) : qualified;
    const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    if (new RegExp(`(^|[^A-Za-z0-9_$])"?${escaped}"?($|[^A-Za-z0-9_$])`, "i").test(sql)) found.add(name);
  }
  return found;
}
