//! The IndexedDB fallback for browsers without OPFS access handles: the
//! replica is an in-memory SQLite database whose whole image
//! (`sqlite3_js_db_export`) is stored under one key after every committed
//! transaction, and read back (`sqlite3_deserialize`) when the replica
//! opens. One `put` replaces the image atomically, so a killed tab leaves
//! the last saved image whole. Fine for replicas of a few megabytes; each
//! save writes the whole database.

const DB_NAME = "pgrelay";
const STORE = "replicas";

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error ?? new Error("IndexedDB request failed"));
  });
}

export class IdbImage {
  private constructor(
    private readonly db: IDBDatabase,
    private readonly key: string,
  ) {}

  static available(): boolean {
    return typeof indexedDB !== "undefined";
  }

  static async open(key: string): Promise<IdbImage> {
    const r = indexedDB.open(DB_NAME, 1);
    r.onupgradeneeded = () => {
      if (!r.result.objectStoreNames.contains(STORE)) r.result.createObjectStore(STORE);
    };
    return new IdbImage(await request(r), key);
  }

  async load(): Promise<Uint8Array | null> {
    const tx = this.db.transaction(STORE, "readonly");
    const value = (await request(tx.objectStore(STORE).get(this.key))) as Uint8Array | undefined;
    return value ?? null;
  }

  /** Resolves once the image is committed (durability "strict": on disk, not only in the OS cache). */
  async save(image: Uint8Array): Promise<void> {
    const tx = this.db.transaction(STORE, "readwrite", { durability: "strict" });
    tx.objectStore(STORE).put(image, this.key);
    await new Promise<void>((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error ?? new Error("IndexedDB write failed"));
      tx.onabort = () => reject(tx.error ?? new Error("IndexedDB write aborted (is the storage quota used up?)"));
    });
  }

  close(): void {
    this.db.close();
  }
}
