//! How repair messages travel: a binary frame holding a tag byte and the
//! message's JSON, zstd-compressed (digests and keys of thousands of
//! ranges shrink to a fraction).

use super::RepairMessage;

/// First byte of a binary repair frame (snapshot chunks use 1).
pub const REPAIR_TAG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("not a repair frame")]
    NotRepair,
    #[error("repair frame does not decompress within {0} bytes: {1}")]
    Decompress(usize, String),
    #[error("bad repair message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("compressing a repair message: {0}")]
    Compress(String),
}

pub fn encode_repair(message: &RepairMessage) -> Result<Vec<u8>, RepairError> {
    let json = serde_json::to_vec(message)?;
    let compressed =
        zstd::bulk::compress(&json, 3).map_err(|e| RepairError::Compress(e.to_string()))?;
    let mut frame = Vec::with_capacity(compressed.len() + 1);
    frame.push(REPAIR_TAG);
    frame.extend_from_slice(&compressed);
    Ok(frame)
}

/// Decodes a repair frame whose message is at most `max_bytes` as JSON.
pub fn decode_repair(frame: &[u8], max_bytes: usize) -> Result<RepairMessage, RepairError> {
    let Some((&REPAIR_TAG, body)) = frame.split_first() else {
        return Err(RepairError::NotRepair);
    };
    let json = zstd::bulk::decompress(body, max_bytes)
        .map_err(|e| RepairError::Decompress(max_bytes, e.to_string()))?;
    Ok(serde_json::from_slice(&json)?)
}
