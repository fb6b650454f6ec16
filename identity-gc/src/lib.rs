//! Pure security-identity logic, without any Kubernetes or etcd client:
//! labels and the label key string, identity-relevant label filtering with
//! upstream's defaults, and numeric identity ranges. The operator, the node
//! agent and the CLI share it.
//! GC decisions (`gc`, `kvstore`) are here too; the allocator backends are in
//! `cilium-identity-alloc`.

pub mod explosion;
pub mod filter;
pub mod gc;
pub mod kvstore;
pub mod labels;
pub mod ranges;

pub use filter::{FilterError, LabelFilter};
pub use labels::{Label, Labels};
pub use ranges::{RangeError, cluster_range};
