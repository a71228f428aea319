//! What a projection is: a name, its tables, and how a batch of records changes them.

use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::decode::Record;

pub trait Projection: Send + Sync {
    fn name(&self) -> &'static str;
    /// Its tables in schema `rm`, rebuilt and swapped together.
    fn tables(&self) -> &'static [&'static str];
    /// Applies a batch in the caller's transaction, writing unqualified table names (the
    /// transaction's search_path picks the schema). Applying a batch is a pure function of the
    /// rows it reads and the records.
    fn apply<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>>;
    /// Applies a batch of a rebuild's bulk load into side tables nobody reads yet: the same rows
    /// as `apply`, but rows that are only ever appended may be streamed in with `COPY`.
    fn apply_bulk<'a>(&'a self, tx: &'a mut PgConnection, records: &'a [Record]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        self.apply(tx, records)
    }
    /// Its tables that `apply_bulk` only appends to and never reads: a rebuild creates them without
    /// indexes and builds the live tables' indexes and keys once the bulk load is done.
    fn bulk_tables(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Every projection of the product.
pub fn all() -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(crate::balances::Balances),
        std::sync::Arc::new(crate::statement::Statement),
        std::sync::Arc::new(crate::servers::Servers),
        std::sync::Arc::new(crate::invoices::Invoices),
        std::sync::Arc::new(crate::journal::Journal),
        std::sync::Arc::new(crate::metrics::Metrics),
        std::sync::Arc::new(crate::orders::Orders),
    ]
}

pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn Projection>> {
    all().into_iter().find(|projection| projection.name() == name)
}
