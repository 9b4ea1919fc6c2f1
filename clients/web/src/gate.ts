//! One piece of replica work at a time: sync batches, local writes and
//! reads queue here, and an application transaction holds the gate from
//! its begin to its commit or rollback.

export class Gate {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(work: () => T | Promise<T>): Promise<T> {
    const result = this.tail.then(work);
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }

  /** Waits for the gate and keeps it until the returned function is called. */
  hold(): Promise<() => void> {
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    const acquired = this.tail.then(() => undefined);
    this.tail = acquired.then(() => released);
    return acquired.then(() => release);
  }
}
