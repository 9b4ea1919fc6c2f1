//! Decoder for pgoutput's logical replication messages (protocol version 1,
//! text format), as documented in PostgreSQL's "Logical Replication Message
//! Formats". Runs once per row at capture speed, so it borrows from the
//! input and allocates only the strings it returns.

use bytes::Bytes;
use pgrelay_protocol::Row;

/// One column as described by a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity (the key PostgreSQL sends for old rows).
    pub is_key: bool,
}

/// A Relation message: a table's columns as the following rows carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// As sent; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    pub fn qualified_name(&self) -> String {
        let namespace = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        };
        format!("{namespace}.{}", self.name)
    }
}

/// One column's value in a TupleData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value the update did not change; PostgreSQL does not resend it.
    UnchangedToast,
    Text(String),
    Binary(Bytes),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

/// The old row of an update or delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity's columns (the others are null).
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowMessage {
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_oid: u32,
        new: Tuple,
    },
    Update {
        relation_oid: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation_oid: u32,
        old: OldTuple,
    },
    Truncate {
        relation_oids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Begin {
        final_lsn: u64,
        commit_time_us_pg: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_us_pg: i64,
    },
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "message ends early: {wanted} needs {needed} bytes at offset {offset}, {available} left"
    )]
    Truncated {
        wanted: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unknown tuple column kind {kind:?} at offset {offset}")]
    BadColumnKind { kind: char, offset: usize },
    #[error("unexpected tuple marker {marker:?} in {message} at offset {offset}")]
    BadMarker {
        message: &'static str,
        marker: char,
        offset: usize,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    BadUtf8 { what: &'static str, offset: usize },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("empty message")]
    Empty,
    #[error("row for {table} has {got} columns, its relation has {expected}")]
    ColumnCount {
        table: String,
        got: usize,
        expected: usize,
    },
    #[error("binary value in column {table}.{column}; pgrelay asks for text format")]
    BinaryValue { table: String, column: String },
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, needed: usize, wanted: &'static str) -> Result<&'a [u8], DecodeError> {
        let available = self.bytes.len() - self.at;
        if needed > available {
            return Err(DecodeError::Truncated {
                wanted,
                offset: self.at,
                needed,
                available,
            });
        }
        let slice = &self.bytes[self.at..self.at + needed];
        self.at += needed;
        Ok(slice)
    }

    fn u8(&mut self, wanted: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, wanted)?[0])
    }

    fn u16(&mut self, wanted: &'static str) -> Result<u16, DecodeError> {
        let s = self.take(2, wanted)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u32(&mut self, wanted: &'static str) -> Result<u32, DecodeError> {
        let s = self.take(4, wanted)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self, wanted: &'static str) -> Result<u64, DecodeError> {
        let s = self.take(8, wanted)?;
        Ok(u64::from_be_bytes([
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        ]))
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, wanted: &'static str) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                wanted,
                offset: self.at,
                needed: rest.len() + 1,
                available: rest.len(),
            })?;
        let offset = self.at;
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::BadUtf8 {
            what: wanted,
            offset,
        })?;
        self.at += len + 1;
        Ok(text.to_owned())
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16("tuple column count")? as usize;
        // Every column takes at least one byte: never reserve more than could fit.
        let mut values = Vec::with_capacity(count.min(self.bytes.len() - self.at));
        for _ in 0..count {
            let offset = self.at;
            let value = match self.u8("tuple column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.u32("text value length")? as usize;
                    let offset = self.at;
                    let raw = self.take(len, "text value")?;
                    let text = std::str::from_utf8(raw).map_err(|_| DecodeError::BadUtf8 {
                        what: "text value",
                        offset,
                    })?;
                    TupleValue::Text(text.to_owned())
                }
                b'b' => {
                    let len = self.u32("binary value length")? as usize;
                    TupleValue::Binary(Bytes::copy_from_slice(self.take(len, "binary value")?))
                }
                other => {
                    return Err(DecodeError::BadColumnKind {
                        kind: other as char,
                        offset,
                    })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn marker(&mut self) -> Result<(u8, usize), DecodeError> {
        let offset = self.at;
        Ok((self.u8("tuple marker")?, offset))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Decodes one pgoutput message (starting with its type byte).
pub fn decode(data: &[u8]) -> Result<RowMessage, DecodeError> {
    let (&kind, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { bytes: data, at: 1 };
    let message = match kind {
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.u16("column count")? as usize;
            let mut columns = Vec::with_capacity(count.min(data.len()));
            for _ in 0..count {
                let flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                // PostgreSQL sends the int32 `atttypmod` (-1: none) as four bytes.
                let type_modifier =
                    i32::from_be_bytes(r.u32("column type modifier")?.to_be_bytes());
                columns.push(RelationColumn {
                    name,
                    type_oid,
                    type_modifier,
                    is_key: flags & 1 == 1,
                });
            }
            RowMessage::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => RowMessage::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation_oid = r.u32("relation oid")?;
            match r.marker()? {
                (b'N', _) => RowMessage::Insert {
                    relation_oid,
                    new: r.tuple()?,
                },
                (m, offset) => {
                    return Err(DecodeError::BadMarker {
                        message: "insert",
                        marker: m as char,
                        offset,
                    })
                }
            }
        }
        b'U' => {
            let relation_oid = r.u32("relation oid")?;
            let (mut marker, mut offset) = r.marker()?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                let tuple = r.tuple()?;
                old = Some(if marker == b'K' {
                    OldTuple::Key(tuple)
                } else {
                    OldTuple::Full(tuple)
                });
                (marker, offset) = r.marker()?;
            }
            if marker != b'N' {
                return Err(DecodeError::BadMarker {
                    message: "update",
                    marker: marker as char,
                    offset,
                });
            }
            RowMessage::Update {
                relation_oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_oid = r.u32("relation oid")?;
            let old = match r.marker()? {
                (b'K', _) => OldTuple::Key(r.tuple()?),
                (b'O', _) => OldTuple::Full(r.tuple()?),
                (m, offset) => {
                    return Err(DecodeError::BadMarker {
                        message: "delete",
                        marker: m as char,
                        offset,
                    })
                }
            };
            RowMessage::Delete { relation_oid, old }
        }
        b'T' => {
            let count = r.u32("relation count")? as usize;
            let flags = r.u8("truncate flags")?;
            let mut relation_oids = Vec::with_capacity(count.min(data.len() / 4));
            for _ in 0..count {
                relation_oids.push(r.u32("relation oid")?);
            }
            RowMessage::Truncate {
                relation_oids,
                cascade: flags & 1 != 0,
                restart_identity: flags & 2 != 0,
            }
        }
        b'O' => RowMessage::Origin {
            lsn: r.u64("origin lsn")?,
            name: r.cstr("origin name")?,
        },
        b'B' => RowMessage::Begin {
            final_lsn: r.u64("final lsn")?,
            commit_time_us_pg: i64::from_be_bytes(r.u64("commit time")?.to_be_bytes()),
            xid: r.u32("xid")?,
        },
        b'C' => RowMessage::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("end lsn")?,
            commit_time_us_pg: i64::from_be_bytes(r.u64("commit time")?.to_be_bytes()),
        },
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            let content = Bytes::copy_from_slice(r.take(len, "message content")?);
            RowMessage::Message {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other as char)),
    };
    r.finish()?;
    Ok(message)
}

/// The row a tuple describes: text values by column name, NULL as `None`;
/// unchanged TOASTed columns are left out (an absent column in an update
/// kept its value).
pub fn tuple_to_row(relation: &Relation, tuple: Tuple) -> Result<Row, DecodeError> {
    if tuple.0.len() != relation.columns.len() {
        return Err(DecodeError::ColumnCount {
            table: relation.qualified_name(),
            got: tuple.0.len(),
            expected: relation.columns.len(),
        });
    }
    let mut row = Row::new();
    for (column, value) in relation.columns.iter().zip(tuple.0) {
        match value {
            TupleValue::Null => {
                row.insert(column.name.clone(), None);
            }
            TupleValue::UnchangedToast => {}
            TupleValue::Text(text) => {
                row.insert(column.name.clone(), Some(text));
            }
            TupleValue::Binary(_) => {
                return Err(DecodeError::BinaryValue {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                })
            }
        }
    }
    Ok(row)
}

/// The old row of an update or delete: only the key columns for `K`, every
/// column for `O`.
pub fn old_tuple_to_row(relation: &Relation, old: OldTuple) -> Result<Row, DecodeError> {
    match old {
        OldTuple::Full(tuple) => tuple_to_row(relation, tuple),
        OldTuple::Key(tuple) => {
            let mut row = tuple_to_row(relation, tuple)?;
            row.retain(|name, _| relation.columns.iter().any(|c| c.is_key && c.name == *name));
            Ok(row)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
