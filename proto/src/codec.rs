//! The one bincode configuration used for everything baton puts on a wire.
//!
//! Fixed-width integers, little-endian, so that a field always has the same size and byte
//! order whatever its value (golden vectors stay readable and stable). Decoding is bounded
//! by [`DECODE_LIMIT`]: bincode refuses to allocate more than that for one message, so a
//! hostile length field cannot make the decoder reserve gigabytes.

use serde::{de::DeserializeOwned, Serialize};

/// Upper bound for the bytes one decoded message may claim (collections and strings).
/// It is the frame body limit: a message can never legitimately be larger than its frame.
pub const DECODE_LIMIT: usize = crate::frame::MAX_BODY_LEN as usize;

/// The bincode configuration: little-endian, fixed-width integers, bounded decode.
pub fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<DECODE_LIMIT>()
}

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("encode: {0}")]
pub struct EncodeError(String);

/// Bytes could not be decoded into the expected message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// bincode rejected the bytes (truncated, bad tag, over the limit, bad UTF-8, ...).
    #[error("decode: {0}")]
    Malformed(String),
    /// The message decoded but did not use all bytes: the peer and we disagree on the format.
    #[error("decode: {trailing} trailing bytes after a {consumed}-byte message")]
    TrailingBytes { consumed: usize, trailing: usize },
}

/// Encode `value` with the baton configuration.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| EncodeError(e.to_string()))
}

/// Encode `value` with the baton configuration at the end of `out` (a buffer reused from
/// message to message is not grown again for each).
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(drop)
        .map_err(|e| EncodeError(e.to_string()))
}

/// Decode exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, consumed) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if consumed != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            consumed,
            trailing: bytes.len() - consumed,
        });
    }
    Ok(value)
}
