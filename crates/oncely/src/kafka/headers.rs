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
/// All of them live in one buffer, with the table of where each header ends
/// at its front: a consumed record costs one allocation for its headers
/// however many it has (a CloudEvents record has five or six; one vector per
/// name and value made copying and freeing them the largest cost of
/// replaying duplicates, see `docs/benchmarks.md`).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers {
    /// `len` spans of [`SPAN`] bytes each, then the names and values.
    buf: Vec<u8>,
    len: usize,
}

/// Bytes of one span in [`Headers::buf`]: where the header's name ends and
/// where its value ends (both counted from the start of the names and
/// values, little-endian `u64`), the top bit of the second marking a null
/// value. Its name runs from the end of the previous header's value.
const SPAN: usize = 16;
const NULL: u64 = 1 << 63;

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Room for `headers` headers of `bytes` bytes in all.
    pub fn with_capacity(headers: usize, bytes: usize) -> Self {
        Headers { buf: Vec::with_capacity(headers * SPAN + bytes), len: 0 }
    }

    /// The names and values.
    fn data(&self) -> &[u8] {
        &self.buf[self.len * SPAN..]
    }

    /// Span `i`: where its name ends, where its value ends, whether it is null.
    fn span(&self, i: usize) -> (usize, usize, bool) {
        let at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.buf[i * SPAN + o..i * SPAN + o + 8]);
            u64::from_le_bytes(b)
        };
        let (name_end, value_end) = (at(0), at(8));
        // Both below `buf.len()`, so they fit a usize.
        (name_end as usize, (value_end & !NULL) as usize, value_end & NULL != 0)
    }

    /// Appends a header (`None`: a null value).
    ///
    /// Moves the names and values already stored to make room for the new
    /// span: for more than a few headers, build with
    /// [`from_counted`](Self::from_counted) (what reading a record and
    /// collecting do), which writes each byte once.
    pub fn push(&mut self, name: &[u8], value: Option<&[u8]>) {
        let span = self.span_of(name, value);
        let at = self.len * SPAN;
        self.buf.splice(at..at, span);
        self.extend_data(name, value);
        self.len += 1;
    }

    /// `n` headers of `bytes` bytes of names and values in all, written in
    /// one pass: the span table is laid out first, so no byte moves. A
    /// hostile record can carry a quarter of a million empty headers after a
    /// large value; appending them one by one would move that value once per
    /// header. If `headers` yields fewer than `n`, the unused spans are
    /// removed at the end; past `n`, the rest are appended.
    pub fn from_counted<'a>(
        n: usize,
        bytes: usize,
        headers: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Self {
        let mut h = Headers { buf: Vec::with_capacity(n * SPAN + bytes), len: n };
        h.buf.resize(n * SPAN, 0);
        let mut written = 0;
        for (name, value) in headers {
            if written == n {
                h.push(name, value);
                continue;
            }
            let span = h.span_of(name, value);
            h.buf[written * SPAN..(written + 1) * SPAN].copy_from_slice(&span);
            h.extend_data(name, value);
            written += 1;
        }
        if written < n {
            h.buf.drain(written * SPAN..n * SPAN);
            h.len = written;
        }
        h
    }

    /// The span of a header appended after the names and values stored now.
    fn span_of(&self, name: &[u8], value: Option<&[u8]>) -> [u8; SPAN] {
        let name_end = (self.byte_len() + name.len()) as u64;
        let value_end = name_end + value.map_or(0, <[u8]>::len) as u64;
        let null = if value.is_none() { NULL } else { 0 };
        let mut span = [0u8; SPAN];
        span[..8].copy_from_slice(&name_end.to_le_bytes());
        span[8..].copy_from_slice(&(value_end | null).to_le_bytes());
        span
    }

    fn extend_data(&mut self, name: &[u8], value: Option<&[u8]>) {
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(value.unwrap_or_default());
    }

    /// How many headers (repeats counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Header `i`: name and value.
    pub fn get(&self, i: usize) -> Option<(&[u8], Option<&[u8]>)> {
        if i >= self.len {
            return None;
        }
        let (name_end, value_end, null) = self.span(i);
        let start = i.checked_sub(1).map_or(0, |p| self.span(p).1);
        let data = self.data();
        let name = &data[start..name_end];
        let value = (!null).then(|| &data[name_end..value_end]);
        Some((name, value))
    }

    /// The headers in order.
    pub fn iter(&self) -> HeadersIter<'_> {
        HeadersIter { headers: self, front: 0, back: self.len }
    }

    /// The last value of header `name` (the last wins, as in Spring Kafka's
    /// `lastHeader`); `None` if absent, `Some(None)` if null.
    pub fn last(&self, name: &[u8]) -> Option<Option<&[u8]>> {
        self.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Bytes of all names and values.
    pub fn byte_len(&self) -> usize {
        self.buf.len() - self.len * SPAN
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
        let pairs: Vec<(N, Option<V>)> = iter.into_iter().collect();
        let bytes = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().map_or(0, |v| v.as_ref().len())).sum();
        Headers::from_counted(
            pairs.len(),
            bytes,
            pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref().map(AsRef::as_ref))),
        )
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
