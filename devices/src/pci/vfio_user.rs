//! vfio-user backend: the device lives in another process behind a UNIX socket, reached with
//! the workspace's `vfio_user::Client`. Guest RAM must be file-backed (the VMM's memfd) so the
//! server can mmap it for DMA; the region fds the server passes make BARs mmappable.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_user::vfio::{
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use vfio_user::{Client, DmaProt, DmaRange, IrqSet, MigData, RegionCap};
use vmm_sys_util::eventfd::EventFd;

use super::vfio_backend::{
    BackendError, DmaRegion, MigrationState, MmapArea, Result, VfioBackend, VfioDeviceInfo,
    VfioIrqInfo, VfioRegionInfo,
};

pub struct VfioUserBackend {
    client: Client,
    slow: SlowWatch,
}

impl VfioUserBackend {
    /// Connects to the server listening on `socket` and negotiates the protocol.
    pub fn connect(socket: &Path) -> Result<Self> {
        Ok(VfioUserBackend {
            client: Client::connect(socket)?,
            slow: SlowWatch::new(socket.display().to_string()),
        })
    }

    pub fn from_client(client: Client) -> Self {
        VfioUserBackend {
            client,
            slow: SlowWatch::new("(connected client)".into()),
        }
    }

    /// The client, for commands the trait does not cover yet (device migration).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn sparse_areas(caps: &[RegionCap]) -> Option<Vec<MmapArea>> {
    caps.iter().find_map(|c| match c {
        RegionCap::SparseMmap(areas) => Some(
            areas
                .iter()
                .map(|a| MmapArea {
                    offset: a.offset,
                    size: a.size,
                })
                .collect(),
        ),
        _ => None,
    })
}

impl VfioBackend for VfioUserBackend {
    fn device_info(&mut self) -> Result<VfioDeviceInfo> {
        let i = self.client.device_info()?;
        Ok(VfioDeviceInfo {
            flags: i.flags,
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
        })
    }

    fn region_info(&mut self, index: u32) -> Result<VfioRegionInfo> {
        let info = self.client.region_info(index)?;
        let mmappable = info.mmappable();
        let sparse = sparse_areas(&info.caps);
        let mut areas = VfioRegionInfo::areas_from(info.flags, info.size, sparse);
        let mmap_fd = match info.fd {
            Some(fd) if mmappable => Some((Arc::new(File::from(fd)), info.offset)),
            _ => None,
        };
        // Without an fd there is nothing to map, whatever the flags say.
        if mmap_fd.is_none() {
            areas.clear();
        }
        Ok(VfioRegionInfo {
            flags: info.flags,
            size: info.size,
            mmap_areas: areas,
            mmap_fd,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let t = Instant::now();
        let r = self.client.region_read(index, offset, data);
        self.slow.note(t.elapsed());
        Ok(r?)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let t = Instant::now();
        let r = self.client.region_write(index, offset, data);
        self.slow.note(t.elapsed());
        Ok(r?)
    }

    fn irq_info(&mut self, index: u32) -> Result<VfioIrqInfo> {
        let i = self.client.irq_info(index)?;
        Ok(VfioIrqInfo {
            flags: i.flags,
            count: i.count,
        })
    }

    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> Result<()> {
        if fds.is_empty() {
            return self.disable_irq(index);
        }
        Ok(self.client.set_irq_eventfds(index, 0, fds)?)
    }

    fn disable_irq(&mut self, index: u32) -> Result<()> {
        Ok(self.client.disable_irqs(index)?)
    }

    fn set_irq_unmask_eventfd(&mut self, index: u32, fd: &EventFd) -> Result<()> {
        let set = IrqSet {
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            start: 0,
            count: 1,
            data: Vec::new(),
        };
        // SAFETY: `fd` owns its descriptor and outlives this call, which only borrows it.
        let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        Ok(self.client.set_irqs_raw(&set, &[fd])?)
    }

    fn unmask_irq(&mut self, index: u32) -> Result<()> {
        let set = IrqSet {
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            start: 0,
            count: 1,
            data: Vec::new(),
        };
        Ok(self.client.set_irqs_raw(&set, &[])?)
    }

    fn reset(&mut self) -> Result<()> {
        Ok(self.client.reset()?)
    }

    fn dma_map(&mut self, region: &DmaRegion) -> Result<()> {
        let Some((file, offset)) = region.file() else {
            return Err(BackendError::Unsupported(
                "DMA to anonymous guest RAM over vfio-user (the server needs a file to mmap)",
            ));
        };
        let prot = DmaProt::READ_WRITE;
        Ok(self
            .client
            .dma_map(region.iova, region.size, file.as_fd(), offset, prot)?)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        Ok(self.client.dma_unmap(iova, size)?)
    }

    fn migration_features(&mut self) -> Result<Option<u64>> {
        Ok(self.client.migration_features()?)
    }

    fn migration_region_v1(&mut self) -> Result<Option<(u32, u64)>> {
        Ok(vfio_user::V1Region::find(&self.client)?.map(|r| (r.index, r.size)))
    }

    fn set_migration_state(&mut self, state: MigrationState) -> Result<()> {
        Ok(self.client.set_mig_state(state)?)
    }

    fn migration_state(&mut self) -> Result<MigrationState> {
        Ok(self.client.get_mig_state()?)
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        match self.client.mig_data_read(buf.len())? {
            MigData::Bytes(b) => {
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b[..n]);
                Ok(n)
            }
            MigData::End => Ok(0),
            MigData::NotNow => Err(BackendError::NoMigrationDataNow),
        }
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.client.mig_data_write(data)?)
    }

    fn precopy_info(&mut self) -> Result<(u64, u64)> {
        match self.client.precopy_info() {
            Ok(p) => Ok((p.initial_bytes, p.dirty_bytes)),
            Err(vfio_user::Error::NotOffered(_)) => Err(BackendError::Unsupported("PRECOPY_INFO")),
            Err(e) => Err(e.into()),
        }
    }

    fn stop_copy_size(&mut self) -> Result<u64> {
        match self.client.mig_data_size() {
            Ok(n) => Ok(n),
            Err(vfio_user::Error::NotOffered(_)) => Err(BackendError::Unsupported("MIG_DATA_SIZE")),
            Err(e) => Err(e.into()),
        }
    }

    fn dma_logging_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<u64> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(iova, length)| DmaRange { iova, length })
            .collect();
        Ok(self.client.dma_logging_start(page_size, &ranges)?)
    }

    fn dma_logging_report(&mut self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        Ok(self.client.dma_logging_report(iova, length, page_size)?)
    }

    fn dma_logging_stop(&mut self) -> Result<()> {
        Ok(self.client.dma_logging_stop()?)
    }
}

/// An access slower than this holds its vCPU long enough for a guest to notice.
const SLOW_ACCESS: Duration = Duration::from_millis(10);
/// Slow accesses in a row that make a device "consistently slow".
const SLOW_STREAK: u32 = 8;

/// Region accesses wait for the server's reply with the vCPU that made them held, and a server
/// answering just inside the client's timeout is never an error: this tells the operator, once,
/// that a device is consistently slow, and how slow.
struct SlowWatch {
    socket: String,
    streak: u32,
    worst: Duration,
    reported: bool,
}

impl SlowWatch {
    fn new(socket: String) -> Self {
        SlowWatch {
            socket,
            streak: 0,
            worst: Duration::ZERO,
            reported: false,
        }
    }

    /// Notes one access; true when this one completed the streak that gets reported.
    fn note(&mut self, took: Duration) -> bool {
        if took < SLOW_ACCESS {
            self.streak = 0;
            self.worst = Duration::ZERO;
            return false;
        }
        self.streak += 1;
        self.worst = self.worst.max(took);
        if self.reported || self.streak < SLOW_STREAK {
            return false;
        }
        self.reported = true;
        log::warn!(
            "vfio-user device {} is slow: {} accesses in a row took over {} ms each \
             (the latest {:.1} ms, the slowest {:.1} ms); each holds the vCPU that made it",
            self.socket,
            self.streak,
            SLOW_ACCESS.as_millis(),
            took.as_secs_f64() * 1e3,
            self.worst.as_secs_f64() * 1e3,
        );
        true
    }
}

#[cfg(test)]
mod slow_tests {
    use super::*;

    #[test]
    fn only_a_streak_of_slow_accesses_is_reported_and_only_once() {
        let mut w = SlowWatch::new("s".into());
        let slow = Duration::from_millis(30);
        // Slow accesses broken up by a fast one are not a streak.
        for _ in 0..3 {
            for _ in 0..SLOW_STREAK - 1 {
                assert!(!w.note(slow));
            }
            assert!(!w.note(Duration::from_micros(50)));
        }
        let reports: usize = (0..3 * SLOW_STREAK)
            .map(|_| usize::from(w.note(slow)))
            .sum();
        assert_eq!(reports, 1);
    }
}
