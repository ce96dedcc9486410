//! vfio-user protocol messages (libvfio-user docs/vfio-user.rst), shared by client and server.
