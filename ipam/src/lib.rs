//! Pure cluster-pool IPAM logic, without any Kubernetes client: CIDR
//! parsing and pool validation (used by the operator's config checks), and
//! the per-node pod CIDR allocator.

pub mod allocator;
pub mod book;
pub mod cidr;

pub use allocator::{AllocError, CidrAllocator, PoolUsage};
pub use book::{Book, Decision, parse_pod_cidr};
pub use cidr::{Cidr, CidrError, Family, validate_pools};
