//! Framing of journal records: `magic | length | crc32c | version | payload`, little endian.
//!
//! The CRC covers the version byte and the payload. The magic lets recovery look past a corrupt
//! frame for a valid one, which is how a torn tail is told apart from corruption in the middle.

pub const MAGIC: [u8; 4] = *b"QPKJ";
/// magic (4) + length (4) + crc (4); the length counts the version byte and the payload.
pub const HEADER_LEN: usize = 12;
/// No record is larger; a length beyond it is corruption, not a reason to allocate.
pub const RECORD_LEN_MAX: usize = 64 * 1024 * 1024;

/// The version byte of a group header: the frame the writer puts before each group commit,
/// holding the length of the frames that follow it. Recovery uses it to tell a torn group (a
/// hole anywhere in the last, never-synced write) from corruption of synced data.
pub const GROUP_VERSION: u8 = 0xFF;
/// A group header's size: header (12) + version (1) + body length (8).
pub const GROUP_HEADER_LEN: usize = HEADER_LEN + 1 + 8;

/// Writes a group header for `body_len` bytes of frames into `out[..GROUP_HEADER_LEN]`.
pub fn write_group_header(out: &mut [u8], body_len: u64) {
    let mut header = Vec::with_capacity(GROUP_HEADER_LEN);
    write_frame(&mut header, GROUP_VERSION, &body_len.to_le_bytes());
    out[..GROUP_HEADER_LEN].copy_from_slice(&header);
}

/// The body length a group header frame declares, if `payload` is one.
pub fn group_body_len(version: u8, payload: &[u8]) -> Option<u64> {
    if version != GROUP_VERSION {
        return None;
    }
    payload.try_into().ok().map(u64::from_le_bytes)
}

/// Appends one frame holding `payload` to `out`.
pub fn write_frame(out: &mut Vec<u8>, version: u8, payload: &[u8]) {
    out.extend_from_slice(&header(version, payload));
    out.extend_from_slice(payload);
}

/// What precedes `payload` in its frame (the header and the version byte), for writers that
/// write the payload from where it already is instead of copying it behind the header.
pub fn header(version: u8, payload: &[u8]) -> [u8; HEADER_LEN + 1] {
    let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
    let mut crc = crc32c::crc32c(&[version]);
    crc = crc32c::crc32c_append(crc, payload);
    let mut header = [0_u8; HEADER_LEN + 1];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..12].copy_from_slice(&crc.to_le_bytes());
    header[HEADER_LEN] = version;
    header
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A whole frame: its version, payload and total length on disk.
    Frame { version: u8, payload: &'a [u8], len: usize },
    /// The bytes end before the frame does.
    Truncated,
    /// The frame is there but its magic, length or checksum is wrong.
    Corrupt(&'static str),
}

/// Reads the frame at the start of `bytes`.
pub fn read_frame(bytes: &[u8]) -> FrameRead<'_> {
    read_frame_max(bytes, RECORD_LEN_MAX)
}

/// [`read_frame`] for frames larger than a journal record (checkpoints).
pub fn read_frame_max(bytes: &[u8], len_max: usize) -> FrameRead<'_> {
    if bytes.len() < HEADER_LEN {
        return FrameRead::Truncated;
    }
    if bytes[0..4] != MAGIC {
        return FrameRead::Corrupt("bad magic");
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if len == 0 || len > len_max {
        return FrameRead::Corrupt("bad length");
    }
    let Some(body) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return FrameRead::Truncated;
    };
    if crc32c::crc32c(body) != crc {
        return FrameRead::Corrupt("checksum mismatch");
    }
    FrameRead::Frame { version: body[0], payload: &body[1..], len: HEADER_LEN + len }
}

/// Reads the next frame from `reader` into `buffer` (its version byte, then its payload), for
/// files read a frame at a time (checkpoints) rather than whole. `len_max` bounds what a damaged
/// length may make it allocate: the bytes left in the file, say. Clean and torn ends are both
/// [`FrameRead::Truncated`]: a reader that knows how many frames to expect tells them apart.
pub fn read_frame_from<'b>(
    reader: &mut impl std::io::Read,
    buffer: &'b mut Vec<u8>,
    len_max: usize,
) -> std::io::Result<FrameRead<'b>> {
    let mut header = [0_u8; HEADER_LEN];
    if !read_full(reader, &mut header)? {
        return Ok(FrameRead::Truncated);
    }
    if header[0..4] != MAGIC {
        return Ok(FrameRead::Corrupt("bad magic"));
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if len == 0 {
        return Ok(FrameRead::Corrupt("bad length"));
    }
    if len > len_max {
        return Ok(FrameRead::Truncated);
    }
    buffer.clear();
    buffer.resize(len, 0);
    if !read_full(reader, buffer)? {
        return Ok(FrameRead::Truncated);
    }
    if crc32c::crc32c(buffer) != crc {
        return Ok(FrameRead::Corrupt("checksum mismatch"));
    }
    Ok(FrameRead::Frame { version: buffer[0], payload: &buffer[1..], len: HEADER_LEN + len })
}

/// Fills `out`; `false` if the reader ended first.
fn read_full(reader: &mut impl std::io::Read, out: &mut [u8]) -> std::io::Result<bool> {
    match reader.read_exact(out) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
    }
}

/// Whether any valid frame starts anywhere in `bytes`: if one does after a bad frame, the bad
/// frame is corruption in the middle of the log, not a torn tail.
pub fn any_valid_frame(bytes: &[u8]) -> bool {
    any_frame_where(bytes, |_, _| true)
}

/// Whether a valid group header starts anywhere in `bytes`: the writer starts every write with
/// one, so after damage in a journal of groups, only a group header tells that a later write
/// follows (frames of the damaged, last write itself may have reached the disk around a hole).
pub fn any_valid_group_header(bytes: &[u8]) -> bool {
    any_frame_where(bytes, |version, payload| group_body_len(version, payload).is_some())
}

/// Whether a valid frame whose version and payload pass `accept` starts anywhere in `bytes`.
fn any_frame_where(bytes: &[u8], accept: impl Fn(u8, &[u8]) -> bool) -> bool {
    let mut start = 0;
    while let Some(offset) = find_magic(&bytes[start..]) {
        let at = start + offset;
        if let FrameRead::Frame { version, payload, .. } = read_frame(&bytes[at..])
            && accept(version, payload)
        {
            return true;
        }
        start = at + 1;
    }
    false
}

fn find_magic(bytes: &[u8]) -> Option<usize> {
    bytes.windows(MAGIC.len()).position(|window| window == MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_detect_damage() {
        let mut out = Vec::new();
        write_frame(&mut out, 1, b"hello");
        match read_frame(&out) {
            FrameRead::Frame { version, payload, len } => {
                assert_eq!((version, payload, len), (1, &b"hello"[..], out.len()));
            }
            other => panic!("{other:?}"),
        }
        for cut in 0..out.len() {
            assert_eq!(read_frame(&out[..cut]), FrameRead::Truncated, "cut at {cut}");
            let mut buffer = Vec::new();
            let read = read_frame_from(&mut &out[..cut], &mut buffer, usize::MAX).map_err(|e| e.to_string());
            assert_eq!(read, Ok(FrameRead::Truncated), "streamed, cut at {cut}");
        }
        let mut buffer = Vec::new();
        let mut reader = &out[..];
        assert!(matches!(
            read_frame_from(&mut reader, &mut buffer, usize::MAX),
            Ok(FrameRead::Frame { version: 1, payload: b"hello", .. })
        ));
        let mut buffer = Vec::new();
        assert!(
            matches!(read_frame_from(&mut &out[..], &mut buffer, 3), Ok(FrameRead::Truncated)),
            "a length past what is left is not allocated"
        );
        for byte in 0..out.len() {
            for bit in 0..8 {
                let mut damaged = out.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    !matches!(read_frame(&damaged), FrameRead::Frame { .. }),
                    "flip {byte}:{bit} went unseen"
                );
                let mut buffer = Vec::new();
                assert!(
                    !matches!(
                        read_frame_from(&mut &damaged[..], &mut buffer, usize::MAX),
                        Ok(FrameRead::Frame { .. })
                    ),
                    "flip {byte}:{bit} went unseen, streamed"
                );
            }
        }
    }
}
