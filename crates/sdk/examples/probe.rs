//! Host side of a round trip by hand: `probe PREFIX INPUT_SERVICE OUTPUT_SERVICE`.
use std::time::Duration;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let iox2 = bulkhead_sdk::Iox2 {
        prefix: Some(a[1].clone()),
        root: None,
        space: None,
    };
    let host = bulkhead_sdk::Host::new(&iox2).unwrap();
    let p = host.publisher(&a[2], 1 << 20).unwrap();
    let s = host.subscriber(&a[3], 4).unwrap();
    p.send(b"ping").unwrap();
    match s.recv_timeout(Duration::from_secs(3)).unwrap() {
        Some(m) => println!("got {:?}", String::from_utf8_lossy(&m)),
        None => println!("timeout"),
    }
}
