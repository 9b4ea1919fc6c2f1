//! React binding: `useQuery(db, sql, params)` re-renders when the rows a
//! query reads change (a thin layer over `db.watch`).

import { useEffect, useState } from "react";
import type { Params, PgRelay, ResultRow } from "./index.js";

export interface QueryState<T> {
  rows: T[];
  loading: boolean;
  error: Error | null;
}

export function useQuery<T = ResultRow>(db: PgRelay | null | undefined, sql: string, params: Params = []): QueryState<T> {
  const [state, setState] = useState<QueryState<T>>({ rows: [], loading: true, error: null });
  const key = JSON.stringify(params);
  useEffect(() => {
    if (!db) return undefined;
    return db.watch<T>(
      sql,
      JSON.parse(key) as Params,
      (rows) => setState({ rows, loading: false, error: null }),
      (error) => setState((s) => ({ ...s, loading: false, error })),
    );
  }, [db, sql, key]);
  return state;
}
