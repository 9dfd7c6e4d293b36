//! A record's headers as bytes, in one buffer, and bytes made readable.
//!
//! This is the shape oncely keeps headers in from the moment a record is read
//! ([`message_headers`](super::message_headers)) to its dead letter, outbox
//! row or redrive: Kafka requires neither names nor values to be UTF-8.

use std::fmt;

/// A record's headers in order: names and values as the producer sent them
/// (bytes: Kafka requires neither to be UTF-8); a value may be null, and a
/// name may repeat.
///
/// All of them live in one buffer: a consumed record costs two allocations
/// for its headers however many it has (a CloudEvents record has five or
/// six; one vector per name and value made copying and freeing them the
/// largest cost of replaying duplicates, see `docs/benchmarks.md`).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers {
    bytes: Vec<u8>,
    spans: Vec<HeaderSpan>,
}

/// Where one header ends in [`Headers::bytes`]: its name runs from the end
/// of the previous header to `name_end`, its value from there to `value_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct HeaderSpan {
    name_end: usize,
    value_end: usize,
    null: bool,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Room for `headers` headers of `bytes` bytes in all.
    pub fn with_capacity(headers: usize, bytes: usize) -> Self {
        Headers { bytes: Vec::with_capacity(bytes), spans: Vec::with_capacity(headers) }
    }

    /// Appends a header (`None`: a null value).
    pub fn push(&mut self, name: &[u8], value: Option<&[u8]>) {
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len();
        self.bytes.extend_from_slice(value.unwrap_or_default());
        self.spans.push(HeaderSpan { name_end, value_end: self.bytes.len(), null: value.is_none() });
    }

    /// How many headers (repeats counted).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Header `i`: name and value.
    pub fn get(&self, i: usize) -> Option<(&[u8], Option<&[u8]>)> {
        let span = self.spans.get(i)?;
        let start = i.checked_sub(1).map_or(0, |p| self.spans[p].value_end);
        let name = &self.bytes[start..span.name_end];
        let value = (!span.null).then(|| &self.bytes[span.name_end..span.value_end]);
        Some((name, value))
    }

    /// The headers in order.
    pub fn iter(&self) -> HeadersIter<'_> {
        HeadersIter { headers: self, front: 0, back: self.spans.len() }
    }

    /// The last value of header `name` (the last wins, as in Spring Kafka's
    /// `lastHeader`); `None` if absent, `Some(None)` if null.
    pub fn last(&self, name: &[u8]) -> Option<Option<&[u8]>> {
        self.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Bytes of all names and values.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The headers as owned pairs.
    pub fn to_vec(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(k, v)| (escape_bytes(k), v.map(escape_bytes)))).finish()
    }
}

impl<N: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(N, Option<V>)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, Option<V>)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.push(k.as_ref(), v.as_ref().map(AsRef::as_ref));
        }
        h
    }
}

impl<N: AsRef<[u8]>, V: AsRef<[u8]>> From<Vec<(N, Option<V>)>> for Headers {
    fn from(v: Vec<(N, Option<V>)>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a [u8], Option<&'a [u8]>);
    type IntoIter = HeadersIter<'a>;
    fn into_iter(self) -> HeadersIter<'a> {
        self.iter()
    }
}

/// The headers of a [`Headers`], in order: `(name, value)`.
#[derive(Debug, Clone)]
pub struct HeadersIter<'a> {
    headers: &'a Headers,
    front: usize,
    back: usize,
}

impl<'a> Iterator for HeadersIter<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.front += 1;
        self.headers.get(self.front - 1)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.back - self.front, Some(self.back - self.front))
    }
}

impl DoubleEndedIterator for HeadersIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.back -= 1;
        self.headers.get(self.back)
    }
}

impl ExactSizeIterator for HeadersIter<'_> {}

/// Bytes as readable text: valid UTF-8 stays as it is except control
/// characters (escaped like Rust string literals); invalid bytes become
/// `\xNN`. Lossless for printable text, never contains NUL.
pub fn escape_bytes(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}
