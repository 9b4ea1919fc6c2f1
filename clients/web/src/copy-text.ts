//! PostgreSQL's COPY text format, as snapshot chunks carry rows: one row
//! per line, values separated by tabs, `\N` for NULL, backslash escapes
//! for characters that would break the layout. Hand-written because no
//! kept npm package decodes COPY text; it follows the Rust client's
//! `copy_text.rs` case for case.

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

/** Calls `row` with each row's values; returns the number of rows. */
export function forEachRow(data: Uint8Array, row: (values: (string | null)[]) => void): number {
  let text: string;
  try {
    text = decoder.decode(data);
  } catch {
    throw new Error("snapshot chunk is not UTF-8");
  }
  if (text.length > 0 && !text.endsWith("\n")) throw new Error("the last row does not end with a newline");
  let count = 0;
  let start = 0;
  const values: (string | null)[] = [];
  while (start < text.length) {
    const end = text.indexOf("\n", start);
    const line = text.slice(start, end);
    start = end + 1;
    values.length = 0;
    let fieldStart = 0;
    for (;;) {
      const tab = line.indexOf("\t", fieldStart);
      const field = tab < 0 ? line.slice(fieldStart) : line.slice(fieldStart, tab);
      values.push(decodeField(field, count + 1));
      if (tab < 0) break;
      fieldStart = tab + 1;
    }
    row(values);
    count++;
  }
  return count;
}

export function decodeField(field: string, rowNumber: number): string | null {
  if (field === "\\N") return null;
  if (!field.includes("\\")) return field;
  // Octal and hex escapes stand for bytes, so decode into bytes.
  const out: number[] = [];
  const bytes = encoder.encode(field);
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i]!;
    if (b !== 0x5c) {
      out.push(b);
      i++;
      continue;
    }
    if (i + 1 >= bytes.length) throw new Error(`row ${rowNumber}: a value ends with a lone backslash`);
    const next = bytes[i + 1]!;
    i += 2;
    switch (next) {
      case 0x62: out.push(0x08); break; // b
      case 0x66: out.push(0x0c); break; // f
      case 0x6e: out.push(0x0a); break; // n
      case 0x72: out.push(0x0d); break; // r
      case 0x74: out.push(0x09); break; // t
      case 0x76: out.push(0x0b); break; // v
      default:
        if (next >= 0x30 && next <= 0x37) {
          let value = next - 0x30;
          let digits = 1;
          while (digits < 3 && i < bytes.length && bytes[i]! >= 0x30 && bytes[i]! <= 0x37) {
            value = value * 8 + (bytes[i]! - 0x30);
            i++;
            digits++;
          }
          out.push(value & 0xff);
        } else if (next === 0x78 && i < bytes.length && isHex(bytes[i]!)) {
          let value = 0;
          let digits = 0;
          while (digits < 2 && i < bytes.length && isHex(bytes[i]!)) {
            value = value * 16 + parseInt(String.fromCharCode(bytes[i]!), 16);
            i++;
            digits++;
          }
          out.push(value);
        } else {
          out.push(next);
        }
    }
  }
  try {
    return decoder.decode(new Uint8Array(out));
  } catch {
    throw new Error(`row ${rowNumber}: not UTF-8`);
  }
}

function isHex(b: number): boolean {
  return (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);
}
