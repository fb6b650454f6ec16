//! Pure security-identity logic, without any Kubernetes or etcd client:
//! labels and the label key string, identity-relevant label filtering with
//! upstream's defaults, and numeric identity ranges. The operator, the node
//! agent and the CLI share it.
//!
//! Still to come (identity issue): the allocator backends and GC decisions.

pub mod explosion;
pub mod filter;
pub mod labels;
pub mod ranges;

pub use filter::{FilterError, LabelFilter};
pub use labels::{Label, Labels};
pub use ranges::{RangeError, cluster_range};
