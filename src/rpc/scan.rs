//! A msgpack scanner: it walks an encoding without building any value, so the server can
//! bound what a decode would cost before it decodes, and read the top-level keys of a frame
//! body (also when the body arrives in chunks) without decoding the values.

/// What one scan may cost; past any of these the input is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Containers nested in containers.
    pub max_depth: usize,
    /// Values of every kind, container entries included.
    pub max_elements: u64,
    /// What a decode into `rmpv::Value`s would allocate, in bytes (an estimate from the
    /// element count and the string and binary lengths).
    pub max_decoded: u64,
}

impl Limits {
    /// Limits for walking without decoding: only nesting and plain size are bounded.
    pub const WALK: Limits = Limits {
        max_depth: 256,
        max_elements: u64::MAX,
        max_decoded: u64::MAX,
    };

    /// Limits for a decode of `input_len` bytes: at most `max_elements` values, nesting to
    /// `max_depth`, and no more than `factor` times the input (plus some slack) in memory.
    pub fn decode(input_len: usize, max_elements: u64, factor: u64) -> Limits {
        Limits {
            max_depth: 64,
            max_elements,
            max_decoded: (input_len as u64).saturating_mul(factor) + 256 * 1024,
        }
    }
}

/// Why an encoding was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("ends in the middle of a value")]
    Truncated,
    #[error("holds the reserved marker 0xc1")]
    Reserved,
    #[error("nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("holds more than {0} values")]
    TooManyElements(u64),
    #[error("would take more than {0} bytes to decode")]
    TooLarge(u64),
    #[error(
        "has a map key that is {0}; the JavaScript clients cannot decode it (a key must be a string or a number)"
    )]
    MapKey(&'static str),
    #[error("has a map key \"__proto__\", which the JavaScript clients cannot decode")]
    ProtoKey,
    #[error(
        "has a timestamp (extension type -1) of {0} bytes, which the JavaScript clients cannot decode (only 4, 8 or 12)"
    )]
    Timestamp(u64),
    #[error(
        "has a string that is not valid UTF-8, which the clients would read differently from each other and from the server"
    )]
    NotText,
    #[error(
        "has a string that starts with a byte order mark (U+FEFF), which the JavaScript clients drop: they would read another name than the server"
    )]
    Bom,
    #[error(
        "has a timestamp whose nanoseconds are 1,000,000,000 or more, which the Python clients cannot decode"
    )]
    TimestampNanos,
}

/// The cost of one scanned object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Its length in bytes.
    pub len: usize,
    pub elements: u64,
    pub decoded: u64,
}

/// What a decoded value costs besides its payload.
const VALUE_SIZE: u64 = std::mem::size_of::<rmpv::Value>() as u64;
/// Keys longer than this are never one of the watched keys; they are not captured.
const KEY_CAPTURE: usize = 16;
/// The longest `type` captured: longer than any refused type ([`refused_type`]).
const TYPE_CAPTURE: u64 = 32;

#[derive(Debug, Clone, Copy)]
struct Level {
    is_map: bool,
    /// Items still to come (a map of n entries has 2n items).
    remaining: u64,
}

/// What the bytes being skipped are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    Opaque,
    /// A short string in key position at the top level of a top-level map.
    TopKey,
    /// A short string value of a top-level `type` key.
    TypeValue,
    /// A short string in key position deeper down (read for `__proto__`, in the clients' mode).
    Key,
    /// An 8- or 12-byte timestamp, whose nanoseconds are read (in the clients' mode).
    Timestamp,
}

/// Whether an item's head (marker and length bytes) is a timestamp's: an extension, whose type
/// (the last byte of its head) is -1.
fn is_timestamp(head: &[u8]) -> bool {
    matches!(head.first(), Some(0xc7..=0xc9 | 0xd4..=0xd8)) && head.last() == Some(&0xff)
}

/// Whether a timestamp's payload (extension type -1) holds nanoseconds the Python clients
/// refuse (10^9 or more): the top 30 bits of the 8-byte form, the first 32 of the 12-byte one.
fn nanos_out_of_range(payload: &[u8]) -> bool {
    let Some(first) = payload.get(..4) else {
        return false;
    };
    let first = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    let nanos = match payload.len() {
        8 => first >> 2,
        12 => first,
        _ => return false,
    };
    nanos >= 1_000_000_000
}

/// An incremental scanner: feed it bytes in as many pieces as they come.
#[derive(Debug, Clone)]
pub struct Scanner {
    limits: Limits,
    stack: Vec<Level>,
    /// The marker and length bytes of the item being read.
    head: [u8; 9],
    head_len: usize,
    head_need: usize,
    /// Payload bytes still to skip, and what they are.
    skip: u64,
    payload: Payload,
    key: Vec<u8>,
    elements: u64,
    decoded: u64,
    objects: usize,
    /// The top-level object whose map keys are reported, by position.
    watch: Option<usize>,
    watched_is_map: Option<bool>,
    /// The first top-level key of the watched object that a client may not send (one of
    /// [`SERVER_FIELDS`] and [`HEADER_ONLY_FIELDS`]): all that is kept of its keys, so a map
    /// of millions of keys costs nothing to watch.
    refused_key: Option<String>,
    /// The item that comes next is the value of a top-level `type` key.
    type_next: bool,
    /// The first refused message type ([`refused_type`]) found as the `type` of a top-level
    /// map, whichever object.
    refused_type: Option<&'static str>,
    failed: Option<ScanError>,
    /// Bytes consumed so far, over every piece fed.
    consumed: u64,
    /// Whether it also refuses what would make a receiving client fail to decode or fire
    /// the message ([`Scanner::for_chunked`]).
    clients: bool,
    /// The check of the string being read, in the clients' mode.
    text: Option<TextCheck>,
    /// A top-level map's `type` that is not a string was seen.
    type_not_text: bool,
}

/// The UTF-8 check of one string read in pieces: strict (no surrogate), and no leading byte
/// order mark.
#[derive(Debug, Clone, Default)]
struct TextCheck {
    /// The start of a character the last piece ended in.
    carry: [u8; 4],
    carry_len: usize,
    start: [u8; 3],
    seen: usize,
}

impl TextCheck {
    /// Takes the next piece of the string; `false` once it cannot be text.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        if self.seen < 3 {
            let n = (3 - self.seen).min(data.len());
            self.start[self.seen..self.seen + n].copy_from_slice(&data[..n]);
        }
        self.seen = self.seen.saturating_add(data.len());
        // Finish the character the last piece ended in (at most three more bytes).
        while self.carry_len > 0 {
            let Some((&byte, rest)) = data.split_first() else {
                return true;
            };
            self.carry[self.carry_len] = byte;
            self.carry_len += 1;
            data = rest;
            match std::str::from_utf8(&self.carry[..self.carry_len]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() && self.carry_len < 4 => {}
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let tail = &data[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len();
                true
            }
            Err(_) => false,
        }
    }

    /// The verdict once the whole string is read.
    fn finish(&self) -> Result<(), ScanError> {
        if self.carry_len > 0 {
            return Err(ScanError::NotText);
        }
        if self.seen >= 3 && self.start == BOM {
            return Err(ScanError::Bom);
        }
        Ok(())
    }
}

/// A byte order mark in UTF-8: a decoder (the JavaScript clients' TextDecoder) drops it at
/// the start of a string.
const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];

/// How many bytes a marker's head takes (marker included), before any payload.
fn head_len(marker: u8) -> usize {
    match marker {
        0xc4 | 0xcc | 0xd0 | 0xd9 | 0xd4..=0xd8 => 2,
        0xc5 | 0xcd | 0xd1 | 0xda | 0xdc | 0xde | 0xc7 => 3,
        0xc8 => 4,
        0xc6 | 0xca | 0xce | 0xd2 | 0xdb | 0xdd | 0xdf => 5,
        0xc9 => 6,
        0xcb | 0xcf | 0xd3 => 9,
        _ => 1,
    }
}

/// A big-endian length of `n` bytes from `bytes`.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// What a complete head is.
enum Item {
    Scalar,
    /// A string, binary or extension payload of this many bytes.
    Bytes {
        len: u64,
        is_str: bool,
    },
    Container {
        is_map: bool,
        len: u64,
    },
}

fn item(head: &[u8]) -> Result<Item, ScanError> {
    let marker = head[0];
    Ok(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Item::Scalar,
        0xca..=0xd3 => Item::Scalar,
        0x80..=0x8f => Item::Container {
            is_map: true,
            len: u64::from(marker & 0x0f),
        },
        0x90..=0x9f => Item::Container {
            is_map: false,
            len: u64::from(marker & 0x0f),
        },
        0xa0..=0xbf => Item::Bytes {
            len: u64::from(marker & 0x1f),
            is_str: true,
        },
        0xc1 => return Err(ScanError::Reserved),
        0xc4..=0xc6 => Item::Bytes {
            len: be(&head[1..]),
            is_str: false,
        },
        // ext 8/16/32: the length, then one type byte (part of the head), then the payload.
        0xc7..=0xc9 => Item::Bytes {
            len: be(&head[1..head.len() - 1]),
            is_str: false,
        },
        0xd4..=0xd8 => Item::Bytes {
            len: 1 << (marker - 0xd4),
            is_str: false,
        },
        0xd9..=0xdb => Item::Bytes {
            len: be(&head[1..]),
            is_str: true,
        },
        0xdc | 0xdd => Item::Container {
            is_map: false,
            len: be(&head[1..]),
        },
        0xde | 0xdf => Item::Container {
            is_map: true,
            len: be(&head[1..]),
        },
    })
}

impl Scanner {
    /// A scanner that reports the top-level keys of object number `watch` (0 is the first).
    pub fn new(limits: Limits, watch: Option<usize>) -> Self {
        Self {
            limits,
            stack: Vec::new(),
            head: [0; 9],
            head_len: 0,
            head_need: 0,
            skip: 0,
            payload: Payload::Opaque,
            key: Vec::new(),
            elements: 0,
            decoded: 0,
            objects: 0,
            watch,
            watched_is_map: None,
            refused_key: None,
            type_next: false,
            refused_type: None,
            failed: None,
            consumed: 0,
            clients: false,
            text: None,
            type_not_text: false,
        }
    }

    /// A scanner for a chunked message, which its receiver decodes and fires once assembled:
    /// besides bounds, it refuses what would make a client read a name the server did not, or
    /// fail to decode or fire it: a string that is not strict UTF-8 (no surrogate) or starts
    /// with a byte order mark, a map key that is not a string or a number, a `__proto__` key,
    /// a timestamp of odd size or nanoseconds. See also [`Scanner::type_not_text`].
    pub fn for_chunked(limits: Limits, watch: Option<usize>) -> Self {
        Self {
            clients: true,
            ..Self::new(limits, watch)
        }
    }

    /// Whether a top-level map scanned so far has a `type` that is not a string.
    pub(crate) fn type_not_text(&self) -> bool {
        self.type_not_text
    }

    /// Top-level objects complete so far.
    pub(crate) fn objects(&self) -> usize {
        self.objects
    }

    /// Whether the input so far ends between two top-level objects.
    pub(crate) fn at_boundary(&self) -> bool {
        self.failed.is_none() && self.stack.is_empty() && self.head_len == 0 && self.skip == 0
    }

    /// Whether the watched object is a map; `None` until it starts.
    pub(crate) fn watched_is_map(&self) -> Option<bool> {
        self.watched_is_map
    }

    /// The first top-level key of the watched object seen so far that a client may not send.
    pub(crate) fn refused_key(&self) -> Option<&str> {
        self.refused_key.as_deref()
    }

    /// A refused message type ([`refused_type`]), if some top-level map scanned so far has it
    /// as its `type` (any entry of a repeated key).
    pub(crate) fn refused_type(&self) -> Option<&'static str> {
        self.refused_type
    }

    /// Feeds the next piece; an error stays.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), ScanError> {
        self.run(data, usize::MAX).map(|_| ())
    }

    /// Scans until `objects` top-level objects are complete or the data ends; returns the
    /// bytes consumed from `data`.
    pub(crate) fn run(&mut self, data: &[u8], objects: usize) -> Result<usize, ScanError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut pos = 0;
        while pos < data.len() && self.objects < objects {
            let step = self.step(&data[pos..]);
            match step {
                Ok(n) => pos += n,
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        self.consumed += pos as u64;
        Ok(pos)
    }

    /// Consumes at least one byte of `data` (never empty).
    fn step(&mut self, data: &[u8]) -> Result<usize, ScanError> {
        if self.skip > 0 {
            let n = (self.skip.min(data.len() as u64)) as usize;
            if self.payload != Payload::Opaque {
                self.key.extend_from_slice(&data[..n]);
            }
            if let Some(check) = &mut self.text
                && !check.feed(&data[..n])
            {
                return Err(ScanError::NotText);
            }
            self.skip -= n as u64;
            if self.skip == 0 {
                if let Some(check) = self.text.take() {
                    check.finish()?;
                }
                self.payload_done()?;
                self.complete()?;
            }
            return Ok(n);
        }
        if self.head_len == 0 {
            self.head[0] = data[0];
            self.head_len = 1;
            self.head_need = head_len(data[0]);
            let used = 1;
            if self.head_need > 1 {
                return Ok(used);
            }
            self.head_ready()?;
            return Ok(used);
        }
        let n = (self.head_need - self.head_len).min(data.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
        self.head_len += n;
        if self.head_len == self.head_need {
            self.head_ready()?;
        }
        Ok(n)
    }

    /// Whether the next item sits in key position at the top of a top-level map.
    fn in_top_key_position(&self) -> bool {
        self.stack.len() == 1 && self.stack[0].is_map && self.stack[0].remaining.is_multiple_of(2)
    }

    fn count(&mut self, extra_bytes: u64) -> Result<(), ScanError> {
        self.elements += 1;
        self.decoded = self
            .decoded
            .saturating_add(VALUE_SIZE)
            .saturating_add(extra_bytes);
        if self.elements > self.limits.max_elements {
            return Err(ScanError::TooManyElements(self.limits.max_elements));
        }
        if self.decoded > self.limits.max_decoded {
            return Err(ScanError::TooLarge(self.limits.max_decoded));
        }
        Ok(())
    }

    fn head_ready(&mut self) -> Result<(), ScanError> {
        let parsed = item(&self.head[..self.head_len]);
        let marker = self.head[0];
        let timestamp = is_timestamp(&self.head[..self.head_len]);
        self.head_len = 0;
        let watched_top = self.watch == Some(self.objects) && self.stack.is_empty();
        // The item right after a top-level `type` key is its value.
        let type_value = std::mem::take(&mut self.type_next);
        let at_key = self
            .stack
            .last()
            .is_some_and(|level| level.is_map && level.remaining.is_multiple_of(2));
        let parsed = parsed?;
        if self.clients {
            let is_str = matches!(parsed, Item::Bytes { is_str: true, .. });
            if at_key && let Some(kind) = key_kind(marker) {
                return Err(ScanError::MapKey(kind));
            }
            if type_value && !is_str {
                self.type_not_text = true;
            }
            if let Item::Bytes { len, .. } = parsed
                && timestamp
                && !matches!(len, 4 | 8 | 12)
            {
                return Err(ScanError::Timestamp(len));
            }
        }
        match parsed {
            Item::Scalar => {
                if watched_top {
                    self.watched_is_map = Some(false);
                }
                self.count(0)?;
                self.complete()
            }
            Item::Bytes { len, is_str } => {
                if watched_top {
                    self.watched_is_map = Some(false);
                }
                self.count(len)?;
                self.payload = if self.clients && timestamp && len >= 8 {
                    Payload::Timestamp
                } else if !is_str {
                    Payload::Opaque
                } else if type_value && len <= TYPE_CAPTURE {
                    Payload::TypeValue
                } else if len > KEY_CAPTURE as u64 {
                    Payload::Opaque
                } else if self.in_top_key_position() {
                    Payload::TopKey
                } else if self.clients && at_key {
                    Payload::Key
                } else {
                    Payload::Opaque
                };
                self.key.clear();
                if self.clients && is_str {
                    self.text = Some(TextCheck::default());
                }
                if len == 0 {
                    self.text = None;
                    self.payload_done()?;
                    self.complete()
                } else {
                    self.skip = len;
                    Ok(())
                }
            }
            Item::Container { is_map, len } => {
                if watched_top {
                    self.watched_is_map = Some(is_map);
                }
                self.count(0)?;
                let items = if is_map { len.saturating_mul(2) } else { len };
                if items == 0 {
                    return self.complete();
                }
                if self.stack.len() >= self.limits.max_depth {
                    return Err(ScanError::TooDeep(self.limits.max_depth));
                }
                self.stack.push(Level {
                    is_map,
                    remaining: items,
                });
                Ok(())
            }
        }
    }

    fn payload_done(&mut self) -> Result<(), ScanError> {
        let payload = std::mem::replace(&mut self.payload, Payload::Opaque);
        if self.clients
            && matches!(payload, Payload::TopKey | Payload::Key)
            && self.key == b"__proto__"
        {
            return Err(ScanError::ProtoKey);
        }
        if payload == Payload::Timestamp && nanos_out_of_range(&self.key) {
            return Err(ScanError::TimestampNanos);
        }
        match payload {
            Payload::Opaque | Payload::Key | Payload::Timestamp => {}
            Payload::TopKey => {
                self.type_next = self.key == b"type";
                if self.watch == Some(self.objects)
                    && self.refused_key.is_none()
                    && let Ok(key) = std::str::from_utf8(&self.key)
                    && (SERVER_FIELDS.contains(&key) || HEADER_ONLY_FIELDS.contains(&key))
                {
                    self.refused_key = Some(key.to_string());
                }
            }
            Payload::TypeValue => {
                if self.refused_type.is_none() {
                    self.refused_type = std::str::from_utf8(&self.key).ok().and_then(refused_type);
                }
            }
        }
        Ok(())
    }

    /// One item is complete: count it against its container, closing the containers it fills.
    fn complete(&mut self) -> Result<(), ScanError> {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.objects += 1;
                    return Ok(());
                }
                Some(level) => {
                    level.remaining -= 1;
                    if level.remaining > 0 {
                        return Ok(());
                    }
                    self.stack.pop();
                }
            }
        }
    }
}

/// Containers still open during a walk, with the items each still expects (a map's count
/// carries [`Open::MAP`]): the first levels on the stack, deeper ones (rare) on the heap.
struct Open {
    inline: [u64; Open::INLINE],
    len: usize,
    spill: Vec<u64>,
}

impl Open {
    const INLINE: usize = 24;
    /// Marks a map's count (at most twice a 32-bit length, far below this bit).
    const MAP: u64 = 1 << 63;

    fn new() -> Self {
        Self {
            inline: [0; Self::INLINE],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, items: u64) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = items,
            None => self.spill.push(items),
        }
        self.len += 1;
    }

    /// The items the innermost open container still expects.
    fn innermost(&mut self) -> Option<&mut u64> {
        match self.len.checked_sub(1)? {
            i if i < Self::INLINE => self.inline.get_mut(i),
            _ => self.spill.last_mut(),
        }
    }

    /// Whether the next item is a key of the innermost open container (a map).
    fn at_key(&self) -> bool {
        let innermost = match self.len.checked_sub(1) {
            None => return false,
            Some(i) if i < Self::INLINE => self.inline.get(i),
            Some(_) => self.spill.last(),
        };
        innermost.is_some_and(|items| items & Self::MAP != 0 && items % 2 == 0)
    }

    /// Counts one item against the innermost container, closing those it fills; `true` when
    /// none is left open (the walk is done).
    fn complete(&mut self) -> bool {
        while let Some(remaining) = self.innermost() {
            *remaining -= 1;
            if *remaining & !Self::MAP > 0 {
                return false;
            }
            if self.len > Self::INLINE {
                self.spill.pop();
            }
            self.len -= 1;
        }
        true
    }
}

/// Scans the first object of `data`: its length and what decoding it would cost. The same
/// walk as a [`Scanner`] fed all of `data` at once, without its piece-by-piece state.
pub fn object(data: &[u8], limits: Limits) -> Result<Scanned, ScanError> {
    walk::<false>(data, limits)
}

/// [`object`], refusing also what the JavaScript clients' decoder throws on (in Node, out of
/// the process): a map key that is not a string or a number, a `__proto__` key, and a
/// timestamp (extension type -1) that is not 4, 8 or 12 bytes long; and a string that is not
/// valid UTF-8 (an overlong `__proto__` or `type` would pass for another name). For what a
/// client sends to other clients.
pub fn object_for_clients(data: &[u8], limits: Limits) -> Result<Scanned, ScanError> {
    walk::<true>(data, limits)
}

/// Whether the bytes of a string are text every client reads as the server does: UTF-8, with
/// no overlong or truncated sequence (the JavaScript clients' decoder reads `C1 9F` as `_` and
/// runs past a truncated end) and nothing past U+10FFFF. A surrogate (`ED A0..BF ..`) passes:
/// the JavaScript clients encode a lone one that way. (Their decoder joins a high and a low
/// one into the character they stand for, never into ASCII: every name the server reads is
/// ASCII.)
/// (A leading byte order mark is refused apart: [`ScanError::Bom`].)
fn text_for_clients(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    // Every round consumes at least three bytes, so this ends.
    loop {
        match std::str::from_utf8(rest) {
            Ok(_) => return true,
            Err(e) => match rest[e.valid_up_to()..] {
                [0xed, 0xa0..=0xbf, 0x80..=0xbf, ..] => rest = &rest[e.valid_up_to() + 3..],
                _ => return false,
            },
        }
    }
}

/// What a value is, by its marker, when it is not a string or a number.
fn key_kind(marker: u8) -> Option<&'static str> {
    match marker {
        0xc0 => Some("nil"),
        0xc2 | 0xc3 => Some("a boolean"),
        0xc4..=0xc6 => Some("binary"),
        0xc7..=0xc9 | 0xd4..=0xd8 => Some("an extension"),
        0x80..=0x8f | 0xde | 0xdf => Some("a map"),
        0x90..=0x9f | 0xdc | 0xdd => Some("an array"),
        _ => None,
    }
}

fn walk<const CLIENTS: bool>(data: &[u8], limits: Limits) -> Result<Scanned, ScanError> {
    let mut scanned = Scanned {
        len: 0,
        elements: 0,
        decoded: 0,
    };
    let count = |scanned: &mut Scanned, extra: u64| {
        scanned.elements += 1;
        scanned.decoded = scanned
            .decoded
            .saturating_add(VALUE_SIZE)
            .saturating_add(extra);
        if scanned.elements > limits.max_elements {
            return Err(ScanError::TooManyElements(limits.max_elements));
        }
        if scanned.decoded > limits.max_decoded {
            return Err(ScanError::TooLarge(limits.max_decoded));
        }
        Ok(())
    };
    let mut open = Open::new();
    let mut pos = 0usize;
    // Every round consumes at least the marker byte, so this ends within `data.len()` rounds.
    loop {
        let marker = *data.get(pos).ok_or(ScanError::Truncated)?;
        let head = data
            .get(pos..pos + head_len(marker))
            .ok_or(ScanError::Truncated)?;
        pos += head.len();
        let parsed = item(head)?;
        let at_key = CLIENTS && open.at_key();
        if at_key && let Some(kind) = key_kind(marker) {
            return Err(ScanError::MapKey(kind));
        }
        match parsed {
            Item::Scalar => count(&mut scanned, 0)?,
            Item::Bytes { len, is_str } => {
                count(&mut scanned, len)?;
                let rest = (data.len() - pos) as u64;
                if len > rest {
                    return Err(ScanError::Truncated);
                }
                if CLIENTS {
                    let payload = &data[pos..pos + len as usize];
                    if is_str && payload.starts_with(&BOM) {
                        return Err(ScanError::Bom);
                    }
                    if is_str && !text_for_clients(payload) {
                        return Err(ScanError::NotText);
                    }
                    if at_key && payload == b"__proto__" {
                        return Err(ScanError::ProtoKey);
                    }
                    let timestamp = is_timestamp(head);
                    if timestamp && !matches!(len, 4 | 8 | 12) {
                        return Err(ScanError::Timestamp(len));
                    }
                    if timestamp && nanos_out_of_range(payload) {
                        return Err(ScanError::TimestampNanos);
                    }
                }
                pos += len as usize;
            }
            Item::Container { is_map, len } => {
                count(&mut scanned, 0)?;
                let items = if is_map { len.saturating_mul(2) } else { len };
                if items > 0 {
                    if open.len >= limits.max_depth {
                        return Err(ScanError::TooDeep(limits.max_depth));
                    }
                    open.push(if is_map { items | Open::MAP } else { items });
                    continue;
                }
            }
        }
        if open.complete() {
            scanned.len = pos;
            return Ok(scanned);
        }
    }
}

/// Decodes the first object of `data` after a scan shows it stays within `limits`; returns
/// the value and the bytes it took.
pub fn decode(data: &[u8], limits: Limits) -> Result<(rmpv::Value, usize), ScanError> {
    let scanned = object(data, limits)?;
    let mut reader = &data[..scanned.len];
    // The scan proved the object complete and within the depth limit, so this cannot fail.
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, limits.max_depth + 1)
        .map_err(|_| ScanError::Truncated)?;
    Ok((value, scanned.len))
}

/// Checks a decoded value as [`object_for_clients`] checks an encoded one, for values the
/// server builds from what a caller sent (an HTTP call's arguments) before they go to a client.
/// Stricter on one point: any string that is not UTF-8 (a surrogate too) is refused, since the
/// value would be encoded again, and such a string comes out as binary.
pub fn value_for_clients(value: &rmpv::Value) -> Result<(), ScanError> {
    use rmpv::Value;
    match value {
        Value::String(s) if s.as_str().is_none() => Err(ScanError::NotText),
        Value::String(s) if s.as_bytes().starts_with(&BOM) => Err(ScanError::Bom),
        Value::Ext(-1, data) if !matches!(data.len(), 4 | 8 | 12) => {
            Err(ScanError::Timestamp(data.len() as u64))
        }
        Value::Ext(-1, data) if nanos_out_of_range(data) => Err(ScanError::TimestampNanos),
        Value::Array(items) => items.iter().try_for_each(value_for_clients),
        Value::Map(entries) => entries.iter().try_for_each(|(key, value)| {
            match key {
                Value::String(s) if s.as_str().is_none() => Err(ScanError::NotText),
                Value::String(s) if s.as_bytes().starts_with(&BOM) => Err(ScanError::Bom),
                Value::String(s) if s.as_bytes() == b"__proto__" => Err(ScanError::ProtoKey),
                Value::String(_) | Value::Integer(_) | Value::F32(_) | Value::F64(_) => Ok(()),
                Value::Nil => Err(ScanError::MapKey("nil")),
                Value::Boolean(_) => Err(ScanError::MapKey("a boolean")),
                Value::Binary(_) => Err(ScanError::MapKey("binary")),
                Value::Ext(..) => Err(ScanError::MapKey("an extension")),
                Value::Map(_) => Err(ScanError::MapKey("a map")),
                Value::Array(_) => Err(ScanError::MapKey("an array")),
            }?;
            value_for_clients(value)
        }),
        _ => Ok(()),
    }
}

/// Where one top-level entry of an encoded map lies: its key at `key..value`, its value at
/// `value..end` (offsets into the map's encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub key: usize,
    pub value: usize,
    pub end: usize,
}

/// The top-level entries of the map at the start of `data`, located without decoding
/// anything; the iteration ends at the first entry that is not whole.
pub(crate) struct MapEntries<'a> {
    data: &'a [u8],
    pos: usize,
    left: u64,
}

/// The entries of the map at the start of `data`; `None` if no map starts there.
pub(crate) fn map_entries(data: &[u8]) -> Option<MapEntries<'_>> {
    let (left, pos) = match *data.first()? {
        m @ 0x80..=0x8f => (u64::from(m & 0x0f), 1),
        0xde => (be(data.get(1..3)?), 3),
        0xdf => (be(data.get(1..5)?), 5),
        _ => return None,
    };
    Some(MapEntries { data, pos, left })
}

impl Iterator for MapEntries<'_> {
    type Item = MapEntry;

    fn next(&mut self) -> Option<MapEntry> {
        if self.left == 0 {
            return None;
        }
        let walk = |from: usize| {
            let rest = self.data.get(from..)?;
            // Keys and most header values are short strings: their length is in their head.
            if let Some(len) = string_len(rest) {
                return (len <= rest.len()).then_some(from + len);
            }
            object(rest, Limits::WALK).ok().map(|s| from + s.len)
        };
        let key = self.pos;
        let Some((value, end)) = walk(key).and_then(|value| Some((value, walk(value)?))) else {
            self.left = 0;
            return None;
        };
        self.left -= 1;
        self.pos = end;
        Some(MapEntry { key, value, end })
    }
}

/// The length of the head and of the bytes of the string at the start of `data`, read from
/// its head alone; `None` if no string starts there.
fn string_head(data: &[u8]) -> Option<(usize, usize)> {
    Some(match *data.first()? {
        m @ 0xa0..=0xbf => (1, usize::from(m & 0x1f)),
        0xd9 => (2, usize::from(*data.get(1)?)),
        0xda => (3, usize::try_from(be(data.get(1..3)?)).ok()?),
        0xdb => (5, usize::try_from(be(data.get(1..5)?)).ok()?),
        _ => return None,
    })
}

/// The whole encoded length of the string at the start of `data` (head and bytes).
fn string_len(data: &[u8]) -> Option<usize> {
    let (head, len) = string_head(data)?;
    head.checked_add(len)
}

/// The bytes of an encoded string, unchecked as text (for comparing with a known name: equal
/// bytes are the same text); `None` for anything else or a string cut short.
pub(crate) fn string_bytes(encoded: &[u8]) -> Option<&[u8]> {
    let (head, len) = string_head(encoded)?;
    encoded.get(head..head.checked_add(len)?)
}

/// The text of an encoded string; `None` for anything else (or text that is not UTF-8).
pub(crate) fn text(encoded: &[u8]) -> Option<&str> {
    rmp::decode::read_str_from_slice(encoded)
        .ok()
        .map(|(s, _)| s)
}

/// The encoded value of `key` in the map at the start of `data` (top-level keys only),
/// found without decoding anything else; `None` if there is no such map or key.
pub(crate) fn map_value<'a>(data: &'a [u8], key: &str) -> Option<&'a [u8]> {
    map_entries(data)?
        .find(|e| text(&data[e.key..e.value]) == Some(key))
        .map(|e| &data[e.value..e.end])
}

/// The encoded items of the array at the start of `data`, at most `max` of them.
pub(crate) fn array_items(data: &[u8], max: usize) -> Option<Vec<&[u8]>> {
    let (len, mut pos) = match *data.first()? {
        m @ 0x90..=0x9f => (u64::from(m & 0x0f), 1),
        0xdc => (be(data.get(1..3)?), 3),
        0xdd => (be(data.get(1..5)?), 5),
        _ => return None,
    };
    if len > max as u64 {
        return None;
    }
    let mut items = Vec::with_capacity(len as usize);
    for _ in 0..len {
        let item = object(data.get(pos..)?, Limits::WALK).ok()?;
        items.push(&data[pos..pos + item.len]);
        pos += item.len;
    }
    Some(items)
}

/// The payload of an encoded binary value.
pub(crate) fn binary_payload(item: &[u8]) -> Option<&[u8]> {
    let mut reader = item;
    let len = rmp::decode::read_bin_len(&mut reader).ok()? as usize;
    reader.get(..len)
}

/// Header fields only the server sets. The clients merge a frame's body over its header, so a
/// body carrying one of these would overrule what the server wrote.
pub const SERVER_FIELDS: [&str; 5] = ["from", "to", "ws", "user", "ctx"];

/// Fields that belong in the header, where the server reads them (what is called, which call
/// is answered), and that a body merged over it would change behind the server's back.
/// `__proto__` makes the JavaScript clients' decoder throw.
pub const HEADER_ONLY_FIELDS: [&str; 3] = ["method", "session", "__proto__"];

/// Why a frame body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the frame body is not valid msgpack: it {0}")]
    Msgpack(#[from] ScanError),
    #[error("the frame body must be a msgpack map")]
    NotMap,
    #[error(
        "the frame body carries {0:?}, a field only the server sets; the server fills in from, to, ws and user itself"
    )]
    ServerField(String),
    #[error(
        "the frame body carries {0:?}, which only the header may carry: the server reads it there"
    )]
    HeaderField(String),
    #[error("the frame body gives the frame the type {0:?}: {reason}", reason = type_reason(.0))]
    RefusedType(String),
    #[error("the frame body gives the frame a type that is not a string")]
    TypeNotText,
    #[error(
        "the frame body has the key {0:?} twice (the server would read the first, the clients the last)"
    )]
    RepeatedKey(String),
}

/// Message types only the server sends: a client's frame of such a type would make its
/// receiver act on the server's word (`peer_not_found` ends every call to its peer,
/// `client_disconnected` every call to the client it names; the rest are the manager's events).
pub const SERVER_TYPES: [&str; 7] = [
    PEER_NOT_FOUND,
    "client_connected",
    "client_disconnected",
    "service_added",
    "service_removed",
    "workspace_loaded",
    "workspace_deleted",
];

/// Names of the properties every JavaScript object has: the JavaScript clients look a frame's
/// type up among their handlers, find one of these, and throw (in Node, out of the process).
pub const JS_BUILTIN_TYPES: [&str; 12] = [
    "constructor",
    "__proto__",
    "hasOwnProperty",
    "isPrototypeOf",
    "propertyIsEnumerable",
    "toString",
    "toLocaleString",
    "valueOf",
    "__defineGetter__",
    "__defineSetter__",
    "__lookupGetter__",
    "__lookupSetter__",
];

/// The message type as refused, if a client may not send a frame of type `kind`.
pub fn refused_type(kind: &str) -> Option<&'static str> {
    SERVER_TYPES
        .iter()
        .chain(JS_BUILTIN_TYPES.iter())
        .find(|refused| **refused == kind)
        .copied()
}

/// Why a client may not send a frame of type `kind` (see [`refused_type`]).
pub fn type_reason(kind: &str) -> &'static str {
    if SERVER_TYPES.contains(&kind) {
        "a notice only the server sends"
    } else {
        "a name every JavaScript object has, which makes the JavaScript clients fail"
    }
}

/// The `type` of the server's notice that a call's target is gone.
pub const PEER_NOT_FOUND: &str = "peer_not_found";

/// Checks the first object of a frame body (what the clients merge over the header) without
/// decoding it: it must be a map the clients can decode ([`object_for_clients`]) whose
/// top-level keys are none of [`SERVER_FIELDS`] and [`HEADER_ONLY_FIELDS`], and whose `type`,
/// if any, is a string and not refused ([`refused_type`]).
pub fn check_body(body: &[u8]) -> Result<(), BodyError> {
    if body.is_empty() {
        return Ok(());
    }
    object_for_clients(body, Limits::WALK)?;
    // The walk above proved the map whole, so every entry is there.
    let entries = map_entries(body).ok_or(BodyError::NotMap)?;
    // The server reads the first of a repeated key (`args` of a chunked-message call), the
    // clients the last.
    let mut seen = SeenKeys::default();
    for entry in entries {
        // A key that is not text is a number or holds a surrogate: none of the names below.
        let Some(name) = text(&body[entry.key..entry.value]) else {
            continue;
        };
        if !seen.insert(name) {
            return Err(BodyError::RepeatedKey(name.chars().take(100).collect()));
        }
        if SERVER_FIELDS.contains(&name) {
            return Err(BodyError::ServerField(name.to_string()));
        }
        if HEADER_ONLY_FIELDS.contains(&name) {
            return Err(BodyError::HeaderField(name.to_string()));
        }
        if name == "type" {
            // The JavaScript clients look the type up among their handlers as a property name
            // (`["constructor"]` reads as "constructor"), so it must be text.
            let kind = text(&body[entry.value..entry.end]).ok_or(BodyError::TypeNotText)?;
            if let Some(kind) = refused_type(kind) {
                return Err(BodyError::RefusedType(kind.to_string()));
            }
        }
    }
    Ok(())
}

/// The keys of a map seen so far: the first few in place (a frame body has a handful), the
/// rest in a set, so that checking for a repeat allocates nothing for a usual body and stays
/// linear for a large one.
#[derive(Default)]
struct SeenKeys<'a> {
    first: [&'a str; 16],
    len: usize,
    rest: std::collections::HashSet<&'a str>,
}

impl<'a> SeenKeys<'a> {
    /// `false` if `key` was seen before.
    fn insert(&mut self, key: &'a str) -> bool {
        if self.first[..self.len].contains(&key) {
            return false;
        }
        if self.len < self.first.len() {
            self.first[self.len] = key;
            self.len += 1;
            return true;
        }
        self.rest.insert(key)
    }
}

/// The verdict on the watched object of a scanner that has read all of it.
pub(crate) fn verdict(scanner: &Scanner) -> Result<(), BodyError> {
    if scanner.watched_is_map() != Some(true) {
        return Err(BodyError::NotMap);
    }
    // The first offending key, as the whole-slice check finds it.
    if let Some(key) = scanner.refused_key() {
        return Err(if SERVER_FIELDS.contains(&key) {
            BodyError::ServerField(key.to_string())
        } else {
            BodyError::HeaderField(key.to_string())
        });
    }
    if scanner.type_not_text() {
        return Err(BodyError::TypeNotText);
    }
    match scanner.refused_type() {
        Some(kind) => Err(BodyError::RefusedType(kind.to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rmpv::Value;

    /// The piece-by-piece scanner's answer for a whole slice, to hold [`object`] to it.
    fn by_scanner(data: &[u8], limits: Limits) -> Result<Scanned, ScanError> {
        let mut scanner = Scanner::new(limits, None);
        let len = scanner.run(data, 1)?;
        if scanner.objects() < 1 {
            return Err(ScanError::Truncated);
        }
        Ok(Scanned {
            len,
            elements: scanner.elements,
            decoded: scanner.decoded,
        })
    }

    /// The scanner's verdict on a body, to hold [`check_body`] to it.
    fn body_by_scanner(body: &[u8]) -> Result<(), BodyError> {
        if body.is_empty() {
            return Ok(());
        }
        let mut scanner = Scanner::new(Limits::WALK, Some(0));
        scanner.run(body, 1)?;
        if scanner.objects() < 1 {
            return Err(BodyError::Msgpack(ScanError::Truncated));
        }
        verdict(&scanner)
    }

    /// A map of `keys` (server fields among them) to values of random bytes.
    fn body(keys: &[usize], values: &[u8]) -> Vec<u8> {
        const NAMES: [&str; 7] = [
            "args",
            "from",
            "to",
            "user",
            "ctx",
            "a-key-longer-than-16",
            "ws",
        ];
        let mut out = vec![0x80 | keys.len() as u8];
        for (i, key) in keys.iter().enumerate() {
            let name = NAMES[key % NAMES.len()];
            out.push(0xa0 | name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(values.get(i).copied().unwrap_or(0xc0));
        }
        out.extend_from_slice(values);
        out
    }

    /// [`map_entries`] as the general walker alone would find them (no string fast path).
    fn entries_by_walker(data: &[u8]) -> Option<Vec<MapEntry>> {
        let mut entries = map_entries(data)?;
        let walk = |from: usize| Some(from + object(data.get(from..)?, Limits::WALK).ok()?.len);
        let mut out = Vec::new();
        while entries.left > 0 {
            let key = entries.pos;
            let Some((value, end)) = walk(key).and_then(|value| Some((value, walk(value)?))) else {
                break;
            };
            entries.left -= 1;
            entries.pos = end;
            out.push(MapEntry { key, value, end });
        }
        Some(out)
    }

    /// A string of `len` bytes in msgpack's encoding `form` (fixstr, str8, str16, str32).
    fn string_in(form: u8, len: usize) -> Vec<u8> {
        let mut out = match form % 4 {
            0 => vec![0xa0 | (len as u8 & 0x1f)],
            1 => vec![0xd9, len as u8],
            2 => [&[0xda][..], &(len as u16).to_be_bytes()].concat(),
            _ => [&[0xdb][..], &(len as u32).to_be_bytes()].concat(),
        };
        out.extend(std::iter::repeat_n(b'x', len));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn map_entries_agree_with_the_walker_whatever_the_strings(
            // Lengths past 255 and 65,535 too: the high bytes of str16 and str32 heads count.
            strings in proptest::collection::vec(
                (any::<u8>(), prop_oneof![0usize..40, 250usize..300, 65_530usize..65_540]),
                0..12,
            ),
            claimed in 0u8..16,
            cut in any::<proptest::sample::Index>(),
            tail in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut data = vec![0x80 | claimed];
            for (form, len) in &strings {
                data.extend(string_in(*form, *len));
            }
            data.extend_from_slice(&tail);
            // Whole, cut anywhere, and with a string head claiming more than there is.
            let cut = cut.index(data.len() + 1);
            let mut overlong = data.clone();
            overlong.extend_from_slice(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'x']);
            for data in [&data[..], &data[..cut], &overlong[..]] {
                prop_assert_eq!(map_entries(data).map(|e| e.collect::<Vec<_>>()), entries_by_walker(data));
            }
        }

        #[test]
        fn the_whole_slice_walk_agrees_with_the_scanner(
            nested in 0usize..60,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            max_depth in 0usize..40,
            max_elements in 0u64..300,
            max_decoded in 0u64..20_000,
        ) {
            let mut data = vec![0x92; nested];
            data.extend_from_slice(&tail);
            let limits = Limits { max_depth, max_elements, max_decoded };
            prop_assert_eq!(object(&data, limits), by_scanner(&data, limits));
            prop_assert_eq!(object(&data, Limits::WALK), by_scanner(&data, Limits::WALK));
            prop_assert_eq!(object(&tail, Limits::WALK), by_scanner(&tail, Limits::WALK));
        }

        #[test]
        fn the_body_check_agrees_with_the_scanner(
            keys in proptest::collection::vec(0usize..7, 0..15),
            values in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            for data in [body(&keys, &values), values.clone()] {
                // The scanner reads chunked messages, which their receivers decode inside a
                // call; the body check also refuses what the clients cannot decode at all.
                match object_for_clients(&data, Limits::WALK) {
                    Err(e @ (ScanError::MapKey(_) | ScanError::ProtoKey | ScanError::Timestamp(_) | ScanError::NotText)) => {
                        prop_assert_eq!(check_body(&data), Err(BodyError::Msgpack(e)));
                    }
                    _ => match check_body(&data) {
                        // The scanner (for chunked messages, where the server reads no key
                        // by its first occurrence) lets a repeated key be.
                        Err(BodyError::RepeatedKey(key)) => {
                            let (value, _) = decode(&data, Limits::WALK).unwrap();
                            let entries = value.as_map().unwrap();
                            let times = entries.iter().filter(|(k, _)| k.as_str() == Some(key.as_str())).count();
                            prop_assert!(times >= 2, "{key}");
                        }
                        other => prop_assert_eq!(other, body_by_scanner(&data)),
                    },
                }
            }
        }
    }

    fn pack(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).unwrap();
        out
    }

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    #[test]
    fn lengths_match_the_decoder() {
        let values = [
            Value::Nil,
            Value::from(-3),
            Value::from(u64::MAX),
            Value::F64(1.5),
            Value::from("text"),
            Value::from("x".repeat(300)),
            Value::Binary(vec![1; 70_000]),
            Value::Ext(5, vec![1, 2, 3]),
            Value::Ext(-1, vec![0; 8]),
            Value::Array((0..20).map(Value::from).collect()),
            map(vec![(
                "a",
                Value::Array(vec![map(vec![("b", Value::Nil)])]),
            )]),
        ];
        for value in values {
            let bytes = pack(&value);
            let mut with_tail = bytes.clone();
            with_tail.extend_from_slice(&[0xc0, 0xc0]);
            let scanned = object(&with_tail, Limits::WALK).unwrap();
            assert_eq!(scanned.len, bytes.len(), "{value:?}");
            assert_eq!(decode(&with_tail, Limits::WALK).unwrap().0, value);
            assert_eq!(
                object(&bytes[..bytes.len() - 1], Limits::WALK),
                Err(ScanError::Truncated)
            );
        }
    }

    #[test]
    fn amplifying_input_is_refused_before_decoding() {
        // An array of a million nils: one byte each on the wire, far more decoded.
        let mut nils = vec![0xdd, 0x00, 0x0f, 0x42, 0x40];
        nils.extend(std::iter::repeat_n(0xc0, 1_000_000));
        let limits = Limits::decode(nils.len(), 100_000, 8);
        assert!(matches!(
            decode(&nils, limits),
            Err(ScanError::TooManyElements(_))
        ));
        let limits = Limits::decode(nils.len(), u64::MAX, 8);
        assert!(matches!(decode(&nils, limits), Err(ScanError::TooLarge(_))));
        // A declared length far beyond the input never allocates: it is truncated.
        let huge = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(object(&huge, Limits::WALK), Err(ScanError::Truncated));
        let deep = vec![0x91; 1000];
        assert_eq!(object(&deep, Limits::WALK), Err(ScanError::TooDeep(256)));
        assert_eq!(object(&[0xc1], Limits::WALK), Err(ScanError::Reserved));
    }

    #[test]
    fn body_keys_the_server_owns_are_refused() {
        let clean = pack(&map(vec![
            ("args", Value::Array(vec![])),
            ("with_kwargs", true.into()),
        ]));
        assert_eq!(check_body(&clean), Ok(()));
        assert_eq!(check_body(&[]), Ok(()));
        for key in SERVER_FIELDS {
            let forged = pack(&map(vec![
                ("args", Value::Array(vec![Value::Binary(vec![0; 1000])])),
                (key, "ws-user-alice/x".into()),
            ]));
            assert_eq!(
                check_body(&forged),
                Err(BodyError::ServerField(key.to_string()))
            );
        }
        // A body that would make the frame a notice only the server sends.
        let notice = pack(&map(vec![("type", "peer_not_found".into())]));
        assert_eq!(
            check_body(&notice),
            Err(BodyError::RefusedType("peer_not_found".into()))
        );
        let own_type = pack(&map(vec![("type", "method".into())]));
        assert_eq!(check_body(&own_type), Ok(()));
        // The piece-by-piece scanner says the same, however the bytes are cut, and notices a
        // repeated `type` key; the same words as another key's value or nested are no notice.
        let repeated = pack(&map(vec![
            ("type", "method".into()),
            ("type", "peer_not_found".into()),
        ]));
        let elsewhere = pack(&map(vec![
            ("peer_not_found", "type".into()),
            ("args", map(vec![("type", "peer_not_found".into())])),
        ]));
        for (body, expected) in [
            (
                &notice,
                Err(BodyError::RefusedType("peer_not_found".into())),
            ),
            (
                &repeated,
                Err(BodyError::RefusedType("peer_not_found".into())),
            ),
            (&own_type, Ok(())),
            (&elsewhere, Ok(())),
        ] {
            // A frame's body may not repeat a key at all.
            let whole = match body == &repeated {
                true => Err(BodyError::RepeatedKey("type".into())),
                false => expected.clone(),
            };
            assert_eq!(check_body(body), whole);
            assert_eq!(body_by_scanner(body), expected);
            for piece in 1..body.len() {
                let mut scanner = Scanner::new(Limits::WALK, Some(0));
                for part in body.chunks(piece) {
                    scanner.feed(part).unwrap();
                }
                assert_eq!(verdict(&scanner), expected, "{piece}");
            }
        }
        // Nested keys are the values' business, not the header's.
        let nested = pack(&map(vec![("args", map(vec![("from", 1.into())]))]));
        assert_eq!(check_body(&nested), Ok(()));
        let pairs = pack(&Value::Array(vec![Value::Array(vec![
            "from".into(),
            "x".into(),
        ])]));
        assert_eq!(check_body(&pairs), Err(BodyError::NotMap));
    }

    #[test]
    fn values_are_found_without_decoding_the_rest() {
        let body = pack(&map(vec![
            (
                "args",
                Value::Array(vec!["k".into(), 3.into(), Value::Binary(vec![9; 300])]),
            ),
            ("with_kwargs", false.into()),
        ]));
        let args = map_value(&body, "args").unwrap();
        let items = array_items(args, 8).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(binary_payload(items[2]), Some(&[9u8; 300][..]));
        assert_eq!(binary_payload(items[0]), None);
        assert_eq!(map_value(&body, "promise"), None);
        assert_eq!(array_items(args, 2), None);
        assert_eq!(map_value(&[0x81, 0xa1], "x"), None);
    }

    #[test]
    fn what_the_javascript_clients_cannot_decode_is_refused_for_them() {
        let key = |key: Value| pack(&Value::Map(vec![("a".into(), 1.into()), (key, 2.into())]));
        for (key_value, kind) in [
            (Value::Nil, "nil"),
            (true.into(), "a boolean"),
            (Value::Binary(vec![1, 2]), "binary"),
            (Value::Ext(3, vec![0; 4]), "an extension"),
            (Value::Array(vec![]), "an array"),
            (Value::Map(vec![]), "a map"),
        ] {
            let data = key(key_value.clone());
            assert_eq!(
                object_for_clients(&data, Limits::WALK),
                Err(ScanError::MapKey(kind))
            );
            assert_eq!(
                value_for_clients(&decode(&data, Limits::WALK).unwrap().0),
                Err(ScanError::MapKey(kind))
            );
            // Any other reader takes it as it is.
            assert_eq!(object(&data, Limits::WALK).unwrap().len, data.len());
            assert_eq!(
                check_body(&data),
                Err(BodyError::Msgpack(ScanError::MapKey(kind)))
            );
        }
        for fine in [Value::from(7), Value::from(-3), Value::F64(0.5), "b".into()] {
            let data = key(fine);
            assert_eq!(
                object_for_clients(&data, Limits::WALK).unwrap().len,
                data.len()
            );
        }
        // A key position is found however deep, after nested values, and never in an array.
        let deep = pack(&map(vec![
            (
                "args",
                Value::Array(vec![map(vec![("x", map(vec![("y", 1.into())]))])]),
            ),
            (
                "kwargs",
                Value::Map(vec![
                    ("z".into(), Value::Array(vec![Value::Nil, true.into()])),
                    (Value::Nil, 1.into()),
                ]),
            ),
        ]));
        assert_eq!(
            object_for_clients(&deep, Limits::WALK),
            Err(ScanError::MapKey("nil"))
        );
        let arrays = pack(&Value::Array(vec![
            Value::Nil,
            Value::Map(vec![(1.into(), Value::Nil)]),
            true.into(),
        ]));
        assert!(object_for_clients(&arrays, Limits::WALK).is_ok());
        // `__proto__` is refused as a key, anywhere, and passes as a value.
        let proto = pack(&map(vec![(
            "args",
            Value::Array(vec![map(vec![("__proto__", 1.into())])]),
        )]));
        assert_eq!(
            object_for_clients(&proto, Limits::WALK),
            Err(ScanError::ProtoKey)
        );
        let as_value = pack(&map(vec![("k", "__proto__".into())]));
        assert!(object_for_clients(&as_value, Limits::WALK).is_ok());
        // Timestamps of 4, 8 and 12 bytes pass; of any other size (fixext or ext) they do not,
        // and other extension types are not looked into.
        for len in [4usize, 8, 12] {
            let data = pack(&Value::Array(vec![Value::Ext(-1, vec![0; len])]));
            assert!(object_for_clients(&data, Limits::WALK).is_ok(), "{len}");
        }
        for len in [0usize, 1, 2, 3, 16, 300] {
            let data = pack(&Value::Array(vec![Value::Ext(-1, vec![0; len])]));
            assert_eq!(
                object_for_clients(&data, Limits::WALK),
                Err(ScanError::Timestamp(len as u64)),
                "{len}"
            );
            assert_eq!(
                value_for_clients(&decode(&data, Limits::WALK).unwrap().0),
                Err(ScanError::Timestamp(len as u64))
            );
            let other = pack(&Value::Ext(5, vec![0xff; len]));
            assert!(object_for_clients(&other, Limits::WALK).is_ok());
        }
        let message = ScanError::MapKey("nil").to_string();
        assert!(
            message.contains("JavaScript clients cannot decode"),
            "{message}"
        );
    }

    #[test]
    fn strings_the_clients_would_read_as_other_names_are_refused_for_them() {
        /// A one-entry map whose key and value are strings of these raw bytes.
        fn entry(key: &[u8], value: &[u8]) -> Vec<u8> {
            let mut out = vec![0x81, 0xa0 | key.len() as u8];
            out.extend_from_slice(key);
            out.push(0xa0 | value.len() as u8);
            out.extend_from_slice(value);
            out
        }
        // `_` written overlong (`C1 9F`), which the JavaScript clients read as `_`.
        let overlong_proto = [b"\xc1\x9f_proto__".as_slice()].concat();
        let overlong_from = [b"fro".as_slice(), b"\xc1\xad"].concat();
        let bad = [
            overlong_proto.as_slice(),
            overlong_from.as_slice(),
            b"\xe0\x81\x9f",     // `_` in three bytes
            b"\xf0\x80\x81\x9f", // and in four
            b"ab\xe2\x82",       // truncated at the end
            b"\xf4\x90\x80\x80", // past U+10FFFF
            b"\xff",
            b"\x80",
        ];
        for bytes in bad {
            for data in [entry(bytes, b"v"), entry(b"k", bytes)] {
                assert_eq!(
                    object_for_clients(&data, Limits::WALK),
                    Err(ScanError::NotText),
                    "{bytes:?}"
                );
                assert_eq!(
                    check_body(&data),
                    Err(BodyError::Msgpack(ScanError::NotText))
                );
                assert_eq!(
                    value_for_clients(&decode(&data, Limits::WALK).unwrap().0),
                    Err(ScanError::NotText)
                );
                // Other readers take it as it is.
                assert_eq!(object(&data, Limits::WALK).unwrap().len, data.len());
            }
        }
        // Text passes, and so do surrogates (a JavaScript client's lone one): they decode to
        // no other character. Re-encoded from a decoded value they would turn into binary, so
        // the decoded check refuses them.
        for good in ["plain", "caf\u{e9}", "\u{1f600}", ""] {
            let data = entry(b"k", good.as_bytes());
            assert!(object_for_clients(&data, Limits::WALK).is_ok(), "{good}");
            assert!(value_for_clients(&decode(&data, Limits::WALK).unwrap().0).is_ok());
        }
        for surrogate in [b"\xed\xa0\x80".as_slice(), b"a\xed\xbf\xbfb\xed\xa0\x80"] {
            let data = entry(surrogate, surrogate);
            assert!(object_for_clients(&data, Limits::WALK).is_ok());
            assert_eq!(
                value_for_clients(&decode(&data, Limits::WALK).unwrap().0),
                Err(ScanError::NotText)
            );
        }
        // A long string is checked as a whole.
        let mut long = vec![0xd9, 201];
        long.extend(std::iter::repeat_n(b'a', 200));
        long.push(0xc1);
        assert_eq!(
            object_for_clients(&long, Limits::WALK),
            Err(ScanError::NotText)
        );
        assert!(ScanError::NotText.to_string().contains("not valid UTF-8"));
    }

    #[test]
    fn a_leading_byte_order_mark_and_a_repeated_body_key_are_refused() {
        // The JavaScript clients' TextDecoder (every string in a browser, long ones in Node)
        // drops a leading U+FEFF: "\u{feff}peer_not_found" would read as a server notice.
        let bom = pack(&map(vec![("type", "\u{feff}peer_not_found".into())]));
        assert_eq!(object_for_clients(&bom, Limits::WALK), Err(ScanError::Bom));
        assert_eq!(check_body(&bom), Err(BodyError::Msgpack(ScanError::Bom)));
        let key = pack(&Value::Map(vec![("\u{feff}from".into(), 1.into())]));
        assert_eq!(object_for_clients(&key, Limits::WALK), Err(ScanError::Bom));
        assert_eq!(
            value_for_clients(&decode(&key, Limits::WALK).unwrap().0),
            Err(ScanError::Bom)
        );
        let inside = pack(&map(vec![("k", "a\u{feff}b".into())]));
        assert!(object_for_clients(&inside, Limits::WALK).is_ok());
        // A repeated top-level key, however each is written (fixstr and str8 here).
        let mut twice = vec![0x82, 0xa4];
        twice.extend_from_slice(b"args\x90\xd9\x04args\x91\xa1x");
        assert_eq!(
            check_body(&twice),
            Err(BodyError::RepeatedKey("args".into()))
        );
        let nested = pack(&map(vec![
            ("a", map(vec![("x", 1.into())])),
            ("b", map(vec![("x", 1.into())])),
        ]));
        assert_eq!(check_body(&nested), Ok(()));
        // Past the first sixteen keys too, either side of them.
        let names: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let many = |repeat: Option<&str>| {
            let mut entries: Vec<(&str, Value)> =
                names.iter().map(|n| (n.as_str(), Value::Nil)).collect();
            entries.extend(repeat.map(|n| (n, Value::Nil)));
            pack(&map(entries))
        };
        assert_eq!(check_body(&many(None)), Ok(()));
        for repeated in ["k3", "k30"] {
            assert_eq!(
                check_body(&many(Some(repeated))),
                Err(BodyError::RepeatedKey(repeated.into()))
            );
        }
    }

    /// The verdict on a chunked message fed in pieces of `piece` bytes.
    fn chunked(data: &[u8], piece: usize) -> Result<(), BodyError> {
        let mut scanner = Scanner::for_chunked(Limits::WALK, Some(1));
        for part in data.chunks(piece) {
            scanner.feed(part)?;
        }
        verdict(&scanner)
    }

    /// A chunked body of half a million short keys keeps nothing per key (it used to keep
    /// every key of up to 16 bytes: gigabytes for a few hundred megabytes sent); the first
    /// refused key after them is still the one reported.
    #[test]
    fn a_body_of_many_keys_is_watched_without_keeping_them() {
        let main = pack(&map(vec![("type", "method".into())]));
        let entries = 500_000u32;
        let mut body = vec![0xdf];
        body.extend((entries + 2).to_be_bytes());
        for _ in 0..entries {
            body.extend([0xa0, 0xc0]);
        }
        for key in ["ws", "from"] {
            body.push(0xa0 | key.len() as u8);
            body.extend(key.as_bytes());
            body.push(0xc0);
        }
        let mut scanner = Scanner::for_chunked(Limits::WALK, Some(1));
        for part in [main.as_slice(), &body].concat().chunks(65_536) {
            scanner.feed(part).unwrap();
        }
        assert_eq!(scanner.refused_key(), Some("ws"));
        assert_eq!(verdict(&scanner), Err(BodyError::ServerField("ws".into())));
    }

    #[test]
    fn chunked_messages_are_held_to_what_both_clients_decode_and_fire() {
        let main = pack(&map(vec![("type", "method".into())]));
        let with_body = |body: &[u8]| [main.as_slice(), body].concat();
        let fine = with_body(&pack(&map(vec![
            ("args", Value::Array(vec!["caf\u{e9} \u{1f600}".into()])),
            ("kwargs", Value::Map(vec![("x".into(), 1.into())])),
        ])));
        // Every character cut at every place.
        for piece in [1, 2, 3, 5, 4096] {
            assert_eq!(chunked(&fine, piece), Ok(()), "{piece}");
        }
        let raw_key = |key: &[u8]| {
            let mut body = vec![0x82, 0xa4];
            body.extend_from_slice(b"args\x90");
            body.push(0xa0 | key.len() as u8);
            body.extend_from_slice(key);
            body.push(0x01);
            with_body(&body)
        };
        let nested_key = |key: Value| {
            with_body(&pack(&map(vec![(
                "args",
                Value::Array(vec![Value::Map(vec![(key, 1.into())])]),
            )])))
        };
        let cases = [
            // `from` written overlong: the JavaScript clients read "from".
            (raw_key(b"fro\xc1\xad"), ScanError::NotText),
            // A surrogate: the Python clients fail to decode it (and keep the chunks).
            (raw_key(b"\xed\xa0\x80"), ScanError::NotText),
            (raw_key(b"ab\xe2\x82"), ScanError::NotText),
            (raw_key(b"\xef\xbb\xbffrom"), ScanError::Bom),
            (raw_key(b"__proto__"), ScanError::ProtoKey),
            (nested_key("__proto__".into()), ScanError::ProtoKey),
            (nested_key(Value::Nil), ScanError::MapKey("nil")),
            (
                with_body(&pack(&map(vec![(
                    "args",
                    Value::Array(vec![Value::Ext(-1, vec![0; 3])]),
                )]))),
                ScanError::Timestamp(3),
            ),
        ];
        for (data, expected) in cases {
            for piece in [1, 2, 4096] {
                assert_eq!(
                    chunked(&data, piece),
                    Err(BodyError::Msgpack(expected.clone())),
                    "{piece}: {expected}"
                );
            }
        }
        // A timestamp's nanoseconds must be below 10^9 (the Python clients refuse the rest),
        // in the 8-byte form (top 30 bits) and the 12-byte one (first 32).
        let stamp = |payload: Vec<u8>| {
            with_body(&pack(&map(vec![(
                "args",
                Value::Array(vec![Value::Ext(-1, payload)]),
            )])))
        };
        let nanos_8 = |nanos: u64| ((nanos << 34) | 1).to_be_bytes().to_vec();
        let nanos_12 = |nanos: u32| [nanos.to_be_bytes().as_slice(), &[0; 8]].concat();
        for (payload, ok) in [
            (nanos_8(999_999_999), true),
            (nanos_8(1_000_000_000), false),
            (nanos_8((1 << 30) - 1), false),
            (nanos_12(999_999_999), true),
            (nanos_12(1_000_000_000), false),
            (vec![0xff; 4], true),
        ] {
            let data = stamp(payload.clone());
            let expected = match ok {
                true => Ok(()),
                false => Err(BodyError::Msgpack(ScanError::TimestampNanos)),
            };
            for piece in [1, 3, 4096] {
                assert_eq!(chunked(&data, piece), expected, "{payload:?}");
            }
            let whole = pack(&Value::Ext(-1, payload));
            assert_eq!(
                object_for_clients(&whole, Limits::WALK).map(|_| ()),
                expected.clone().map_err(|_| ScanError::TimestampNanos)
            );
            assert_eq!(
                value_for_clients(&decode(&whole, Limits::WALK).unwrap().0),
                expected.map_err(|_| ScanError::TimestampNanos)
            );
        }
        // Number keys pass (the JavaScript clients read them; a Python receiver rejects the
        // process, and is then told to remove the chunks).
        assert_eq!(chunked(&nested_key(7.into()), 2), Ok(()));
        // The body's type must be a string, and a long refused one is read too.
        let typed = |kind: Value| with_body(&pack(&map(vec![("type", kind)])));
        assert_eq!(
            chunked(&typed(Value::Array(vec!["constructor".into()])), 1),
            Err(BodyError::TypeNotText)
        );
        assert_eq!(
            chunked(&typed("client_disconnected".into()), 3),
            Err(BodyError::RefusedType("client_disconnected".into()))
        );
        // The plain scanner lets all of these be.
        let mut plain = Scanner::new(Limits::WALK, Some(1));
        plain.feed(&raw_key(b"\xed\xa0\x80")).unwrap();
    }

    #[test]
    fn a_body_type_that_is_not_text_is_refused() {
        for kind in [
            Value::Array(vec!["constructor".into()]),
            Value::from(3),
            Value::Nil,
            Value::Map(vec![]),
        ] {
            let data = pack(&map(vec![("args", Value::Array(vec![])), ("type", kind)]));
            assert_eq!(check_body(&data), Err(BodyError::TypeNotText));
        }
        let fine = pack(&map(vec![("type", "method".into())]));
        assert_eq!(check_body(&fine), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_decoded_check_agrees_with_the_encoded_one(
            data in proptest::collection::vec(
                prop_oneof![Just(0x81u8), Just(0x82), Just(0x91), Just(0xc0), Just(0xc3), Just(0xd4),
                    Just(0xd6), Just(0xff), Just(0xa1), Just(0x5f), Just(0x01), Just(0xa9), Just(0xc4)],
                0..40,
            ),
        ) {
            let encoded = object_for_clients(&data, Limits::WALK);
            match decode(&data, Limits::WALK) {
                Ok((value, _)) => prop_assert_eq!(encoded.map(|_| ()), value_for_clients(&value)),
                // The encoded check may stop earlier, at what the clients cannot decode.
                Err(_) => prop_assert!(encoded.is_err()),
            }
        }
    }

    #[test]
    fn pieces_give_the_same_verdict_as_the_whole() {
        let main = pack(&map(vec![("type", "method".into())]));
        let extra = pack(&map(vec![
            ("args", Value::Array(vec![Value::Binary(vec![7; 5000])])),
            ("ctx", map(vec![("user", "root".into())])),
        ]));
        let whole = [main.clone(), extra].concat();
        for piece in [1, 2, 3, 7, 100, 4096] {
            let mut scanner = Scanner::new(Limits::WALK, Some(1));
            for chunk in whole.chunks(piece) {
                scanner.feed(chunk).unwrap();
            }
            assert_eq!(scanner.objects(), 2);
            assert_eq!(
                verdict(&scanner),
                Err(BodyError::ServerField("ctx".into())),
                "pieces of {piece}"
            );
        }
    }
}
