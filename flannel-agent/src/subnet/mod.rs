//! flannel's subnet leases: their etcd keys, their JSON values and choosing a subnet.

pub mod allocate;
pub mod key;
pub mod lease;

pub use key::{format_key, parse_key};
pub use lease::{BackendData, Lease, LeaseAttrs, VxlanBackendData};
