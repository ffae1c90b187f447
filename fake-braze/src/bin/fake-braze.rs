//! `fake-braze --key KEY [--listen ADDR]`: the stand-in as a process of its own, for checks
//! of an installed binary (the package test runs `aiq-braze-sync check` against it). Prints
//! its base URL on one line, then serves until it is killed.

use std::net::SocketAddr;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut key, mut listen) = (None, SocketAddr::from(([127, 0, 0, 1], 0)));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--key" => key = args.next(),
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("--listen takes an address such as 127.0.0.1:8090")
            }
            "-h" | "--help" => {
                println!("fake-braze --key KEY [--listen ADDR]: a Braze stand-in on ADDR (127.0.0.1:0 by default); prints its URL");
                return Ok(());
            }
            other => panic!("unknown argument {other:?}; see --help"),
        }
    }
    let key = key.expect("--key KEY: the REST API key the stand-in accepts");
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let fake = fake_braze::FakeBraze::start_on(listener, &key).await?;
    println!("{}", fake.url());
    std::future::pending::<()>().await;
    Ok(())
}
