//! Constants reused from `<linux/vfio.h>` that vfio-user messages carry unchanged.

pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_BAR5_REGION_INDEX: u32 = 5;
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const VFIO_PCI_VGA_REGION_INDEX: u32 = 8;
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;

pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
pub const VFIO_PCI_ERR_IRQ_INDEX: u32 = 3;
pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = 2;

pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;

pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const VFIO_IRQ_SET_DATA_TYPE_MASK: u32 =
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD;
pub const VFIO_IRQ_SET_ACTION_TYPE_MASK: u32 =
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER;

/// `VFIO_USER_DMA_MAP` flags.
pub const VFIO_USER_F_DMA_REGION_READ: u32 = 1 << 0;
pub const VFIO_USER_F_DMA_REGION_WRITE: u32 = 1 << 1;

/// `VFIO_DEVICE_FEATURE` flags: the low 16 bits are the feature index.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// Feature indices (`<linux/vfio.h>`); vfio-user's table has 1, 2, 6, 7 and 8.
pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Not in the vfio-user spec; sampledev and this client carry it with the kernel's layout.
pub const VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: u32 = 9;
/// In the kernel a SET-only opt-in; vfio-user has no data_fd to carry the
/// `VFIO_MIG_GET_PRECOPY_INFO` ioctl, so this crate defines GET on this index to return
/// `struct vfio_precopy_info` (see [`crate::PrecopyInfo`]).
pub const VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2: u32 = 12;

/// `VFIO_DEVICE_FEATURE_MIGRATION` flags.
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Most ranges one DMA_LOGGING_START may carry (the kernel's PAGE_SIZE / 16 on 4 KiB pages).
pub const VFIO_DMA_LOGGING_MAX_RANGES: usize = 256;

/// The deprecated v1 migration region, found by its `VFIO_REGION_INFO_CAP_TYPE`.
pub const VFIO_REGION_TYPE_MIGRATION_DEPRECATED: u32 = 3;
pub const VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED: u32 = 1;

/// v1 `device_state` bits; 0 is stopped, `SAVING | RESUMING` is the error state.
pub const VFIO_DEVICE_STATE_V1_STOP: u32 = 0;
pub const VFIO_DEVICE_STATE_V1_RUNNING: u32 = 1 << 0;
pub const VFIO_DEVICE_STATE_V1_SAVING: u32 = 1 << 1;
pub const VFIO_DEVICE_STATE_V1_RESUMING: u32 = 1 << 2;
pub const VFIO_DEVICE_STATE_V1_MASK: u32 = 0x7;
