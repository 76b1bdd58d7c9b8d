//! One keep-alive HTTP/1.1 connection of a measured run, written straight on its TCP stream: the
//! request is formatted into a buffer kept between requests, written in one call, and the answer
//! is read and parsed (httparse) in the same task. Through hyper's client connection each request
//! crossed a channel to the connection's own task and its answer came back through another, two
//! task wake-ups a request on the two cores the server under test also runs on; this costs the
//! load side about half the CPU a request (bench/RESULTS.md). No pipelining: like a kiosk or an
//! ATM, a connection has one request in flight.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most header lines an answer may have.
const HEADERS_MAX: usize = 32;
/// The most bytes an answer's head may take before it is refused as malformed.
const HEAD_LEN_MAX: usize = 64 * 1024;
/// The largest answer body accepted.
const BODY_LEN_MAX: usize = 16 * 1024 * 1024;

/// A server's answer: its status, `Retry-After` in seconds if it gave one, and its body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
}

/// A keep-alive connection to `target`, opened on first use and again after any error.
#[derive(Debug)]
pub struct Link {
    target: String,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    input: Vec<u8>,
}

impl Link {
    pub fn new(target: &str) -> Link {
        Link { target: target.to_owned(), stream: None, out: Vec::new(), input: Vec::new() }
    }

    /// Formats a JSON POST of `body` to `path` with `headers` as the next request to send.
    pub fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        use std::io::Write as _;
        self.out.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(
            self.out,
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            self.target,
            body.len()
        );
        for (name, value) in headers {
            let _ = write!(self.out, "{name}: {value}\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
    }

    /// Sends the request [`post`](Self::post) formatted and reads the whole answer. After an
    /// error (or an answer that closes the connection) the next request connects again.
    pub async fn send(&mut self) -> io::Result<Answer> {
        let result = self.exchange().await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self) -> io::Result<Answer> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(&self.target).await?;
                stream.set_nodelay(true)?;
                self.stream.insert(stream)
            }
        };
        stream.write_all(&self.out).await?;
        self.input.clear();
        let (head_len, body_len, mut answer, close) = loop {
            if let Some(head) = parse_head(&self.input)? {
                break head;
            }
            if self.input.len() > HEAD_LEN_MAX {
                return Err(malformed("answer head too long"));
            }
            read_more(stream, &mut self.input).await?;
        };
        let end = head_len + body_len;
        while self.input.len() < end {
            read_more(stream, &mut self.input).await?;
        }
        if self.input.len() > end {
            return Err(malformed("bytes after the answer (nothing was pipelined)"));
        }
        answer.body = self.input[head_len..end].to_vec();
        if close {
            self.stream = None;
        }
        Ok(answer)
    }
}

/// Reads what the stream has into `input`; the end of the stream is an error (an answer is due).
async fn read_more(stream: &mut TcpStream, input: &mut Vec<u8>) -> io::Result<()> {
    input.reserve(4096);
    if stream.read_buf(input).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
    }
    Ok(())
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The answer's head in `input` if it is all there: its length, the body's length, the answer
/// without its body, and whether the server closes the connection after it.
fn parse_head(input: &[u8]) -> io::Result<Option<(usize, usize, Answer, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(malformed(&format!("answer head: {error}"))),
    };
    let status = response.code.unwrap_or(0);
    let (mut body_len, mut retry_after, mut close) = (None, None, false);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let len = value.parse::<usize>().map_err(|_| malformed("bad content-length"))?;
            if len > BODY_LEN_MAX {
                return Err(malformed("answer body too large"));
            }
            body_len = Some(len);
        } else if header.name.eq_ignore_ascii_case("retry-after") {
            retry_after = value.parse::<u64>().ok();
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(malformed("chunked answers are not read (the server sends lengths)"));
        }
    }
    let body_len = match (status, body_len) {
        (100..=199 | 204 | 304, _) => 0,
        (_, Some(len)) => len,
        (_, None) => return Err(malformed("answer without content-length")),
    };
    Ok(Some((head_len, body_len, Answer { status, retry_after, body: Vec::new() }, close)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server on loopback that reads one request per element of `answers` and writes the
    /// answer in pieces of `piece` bytes; returns its address and the requests it read.
    async fn server(
        answers: Vec<&'static [u8]>,
        piece: usize,
    ) -> (String, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut requests = Vec::new();
            for answer in answers {
                let mut request = Vec::new();
                let mut buffer = [0_u8; 4096];
                // The request is whole once its head has ended and its body (content-length) is in.
                loop {
                    let n = socket.read(&mut buffer).await.expect("read");
                    request.extend_from_slice(&buffer[..n]);
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let mut parsed = httparse::Request::new(&mut headers);
                    if let Ok(httparse::Status::Complete(head)) = parsed.parse(&request) {
                        let len = parsed
                            .headers
                            .iter()
                            .find(|h| h.name == "content-length")
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= head + len {
                            break;
                        }
                    }
                }
                requests.push(request);
                for chunk in answer.chunks(piece) {
                    socket.write_all(chunk).await.expect("write");
                    socket.flush().await.expect("flush");
                    tokio::task::yield_now().await;
                }
            }
            requests
        });
        (address, task)
    }

    #[tokio::test]
    async fn answers_are_read_whole_whatever_pieces_they_arrive_in() {
        let first: &[u8] =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
        let second: &[u8] =
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 2\r\n\r\n{}";
        let (address, task) = server(vec![first, second], 3).await;
        let mut link = Link::new(&address);
        link.post("/v1/x", &[("idempotency-key", "k1")], br#"{"a":1}"#);
        let answer = link.send().await.expect("first");
        assert_eq!(answer, Answer { status: 200, retry_after: None, body: br#"{"ok":true}"#.to_vec() });
        link.post("/v1/y", &[], b"{}");
        let answer = link.send().await.expect("second, on the same connection");
        assert_eq!(answer, Answer { status: 429, retry_after: Some(2), body: b"{}".to_vec() });
        let requests = task.await.expect("server");
        let text = String::from_utf8(requests[0].clone()).expect("ascii");
        assert!(text.starts_with("POST /v1/x HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-length: 7\r\n") && text.contains("\r\nidempotency-key: k1\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
    }

    #[tokio::test]
    async fn malformed_or_cut_answers_are_errors_and_the_link_reconnects() {
        let cases: [&'static [u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n{}",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",
        ];
        for case in cases {
            let (address, task) = server(vec![case], 5).await;
            let mut link = Link::new(&address);
            link.post("/", &[], b"{}");
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let result = link.send().await;
                drop(task.await);
                result
            });
            // The cut answer ends with the server closing its side.
            let result = read.await.expect("no hang");
            assert!(result.is_err(), "{:?} accepted", String::from_utf8_lossy(case));
            assert!(link.stream.is_none(), "a failed link is dropped");
        }
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let close: &[u8] =
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let (address, task) = server(vec![close], 64).await;
        let mut link = Link::new(&address);
        link.post("/", &[], b"");
        let answer = link.send().await.expect("answer");
        assert_eq!((answer.status, answer.body.len()), (503, 0));
        assert!(link.stream.is_none());
        drop(task.await);
    }
}
