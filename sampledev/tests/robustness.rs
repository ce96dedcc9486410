//! Bad clients must not crash sampledev, a second client is turned away, and a sampledev
//! that dies leaves the client with DeviceLost rather than a hang.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::*;
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{
    Client, ClientOptions, Command, DmaProt, Error, Header, IrqSet, MAX_MSG_SIZE, Version,
    recv_message, send_message,
};

fn errno(r: Result<(), Error>) -> i32 {
    r.expect_err("request should have been refused")
        .errno()
        .expect("an error reply from the server")
}

#[test]
fn bad_requests_are_refused_and_the_device_keeps_working() {
    let srv = Server::start("64K");
    let c = srv.connect();
    let mut b = [0u8; 8];
    assert_eq!(errno(c.region_read(0, BAR0_SIZE - 4, &mut b)), libc::EINVAL);
    assert_eq!(errno(c.region_read(20, 0, &mut b)), libc::EINVAL);
    assert_eq!(
        errno(c.region_write(VFIO_PCI_ROM_REGION_INDEX, 0, &b)),
        libc::EINVAL
    );
    assert_eq!(errno(c.irq_info(9).map(|_| ())), libc::EINVAL);
    assert_eq!(errno(c.region_info(9).map(|_| ())), libc::EINVAL);

    let ram = memfd(1 << 20);
    c.dma_map(0, 1 << 20, ram.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap();
    let again = c.dma_map(0x8_0000, 1 << 20, ram.as_fd(), 0, DmaProt::READ);
    assert_eq!(errno(again), libc::EEXIST);
    let short = c.dma_map(1 << 30, 2 << 20, ram.as_fd(), 0, DmaProt::READ);
    assert_eq!(errno(short), libc::EINVAL);
    assert_eq!(errno(c.dma_unmap(0x1000, 0x1000)), libc::ENOENT);

    // A memfd is not an eventfd: writing interrupts into it would corrupt it.
    let not_eventfd = c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[ram.as_fd()]);
    assert_eq!(errno(not_eventfd), libc::EINVAL);
    let e = eventfd();
    assert_eq!(errno(c.set_irq_eventfds(2, 3, &[&e, &e])), libc::EINVAL);
    let mask = IrqSet {
        flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        start: 0,
        count: 1,
        data: vec![],
    };
    assert_eq!(errno(c.set_irqs_raw(&mask, &[])), libc::EINVAL);
    // Feature 0 (PCI_VF_TOKEN) is not a feature of this device: ENOTTY, as in the kernel.
    let feature = c.request(
        Command::DeviceFeature,
        &[8, 0, 0, 0, 0, 0, 2, 0],
        &[],
        64,
        0,
    );
    assert_eq!(errno(feature.map(|_| ())), libc::ENOTTY);
    // DMA_READ goes from server to client; sent to the server it is unsupported.
    let dma_read = c.request(Command::DmaRead, &[0; 16], &[], 64, 0);
    assert_eq!(errno(dma_read.map(|_| ())), libc::ENOTSUP);

    assert_eq!(rd(&c, REG_ID) as u32, ID_MAGIC);
}

#[test]
fn second_client_is_turned_away() {
    let srv = Server::start("64K");
    let c = srv.connect();
    let opts = ClientOptions {
        timeout: Duration::from_secs(2),
    };
    let second = Client::connect_with(&srv.socket, opts);
    assert!(
        matches!(second, Err(Error::DeviceLost)),
        "{:?}",
        second.err()
    );
    assert_eq!(rd(&c, REG_ID) as u32, ID_MAGIC);
}

#[test]
fn garbage_framing_drops_the_client_without_crashing() {
    let mut srv = Server::start("64K");
    let mut s = srv.raw();
    // A header announcing a 4-byte message.
    s.write_all(&[1, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "server should hang up");
    let status = srv.wait_exit(Duration::from_secs(5)).expect("server exits");
    assert!(!status.success());
    assert!(!srv.socket.exists(), "socket file left behind");
}

#[test]
fn oversized_and_out_of_order_requests() {
    let mut srv = Server::start("64K");
    let s = srv.raw();
    // Before VERSION, everything else is refused (but the connection stays).
    let h = Header::request(1, Command::DeviceGetInfo, 16).unwrap();
    send_message(&s, &h, &[0; 16], &[]).unwrap();
    let r = recv_message(&s, MAX_MSG_SIZE, 0, None).unwrap().unwrap();
    assert!(r.header.error && r.header.errno == libc::EINVAL as u32);
    // Unknown command number, then a payload that is not a version message.
    let mut h = Header::request(2, Command::Version, 1).unwrap();
    h.command = 200;
    send_message(&s, &h, &[0], &[]).unwrap();
    let r = recv_message(&s, MAX_MSG_SIZE, 0, None).unwrap().unwrap();
    assert!(r.header.error && r.header.command == 200);
    let h = Header::request(3, Command::Version, 1).unwrap();
    send_message(&s, &h, &[0], &[]).unwrap();
    assert!(
        recv_message(&s, MAX_MSG_SIZE, 0, None)
            .unwrap()
            .unwrap()
            .header
            .error
    );
    // Proper version, then a header claiming 4 GiB: the server hangs up.
    let v = Version {
        major: 0,
        minor: 1,
        caps: Default::default(),
    }
    .encode();
    let h = Header::request(4, Command::Version, v.len()).unwrap();
    send_message(&s, &h, &v, &[]).unwrap();
    assert!(
        !recv_message(&s, MAX_MSG_SIZE, 0, None)
            .unwrap()
            .unwrap()
            .header
            .error
    );
    let mut big = Header::request(5, Command::RegionWrite, 0).unwrap();
    big.size = u32::MAX;
    (&s).write_all(&big.encode()).unwrap();
    assert!(recv_message(&s, MAX_MSG_SIZE, 0, None).unwrap().is_none());
    assert!(srv.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn clean_disconnect_ends_the_server() {
    let mut srv = Server::start("64K");
    drop(srv.connect());
    let status = srv.wait_exit(Duration::from_secs(5)).expect("server exits");
    assert!(status.success(), "{}", srv.log());
}

#[test]
fn killed_server_is_device_lost_quickly() {
    let mut srv = Server::start("64K");
    let c = srv.connect();
    assert_eq!(rd(&c, REG_ID) as u32, ID_MAGIC);
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let t = Instant::now();
    let mut b = [0u8; 8];
    let e = c
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, &mut b)
        .unwrap_err();
    assert!(matches!(e, Error::DeviceLost), "{e}");
    assert!(e.is_device_lost());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(matches!(c.reset(), Err(Error::DeviceLost)));
}
