//! Fills mapped columns that an update left as unchanged TOAST.
//!
//! pgoutput does not resend a TOASTed value the update did not touch, and
//! with Odoo's default replica identity no old value carries it either. A
//! target must never receive a placeholder or a null instead of the real
//! value, so the row is read by key on an ordinary connection. That reads
//! the row as it is now, which may be newer than the change: the later
//! change follows in the stream anyway, so the target ends on the right
//! value. If the row is gone, the change is skipped: its delete follows.

use bytes::Bytes;

use crate::config::SourceConfig;
use crate::model::{Change, TupleValue};
use crate::pipeline::ToastFill;
use crate::source::wire;

#[derive(Default)]
pub struct ToastFiller {
    client: Option<tokio_postgres::Client>,
}

impl ToastFiller {
    /// Replaces the unchanged-TOAST columns of `change` with the row's
    /// values. Ok(false) when the row no longer exists.
    pub async fn fill(
        &mut self,
        source: &SourceConfig,
        change: &mut Change,
        fill: ToastFill,
    ) -> anyhow::Result<bool> {
        if !matches!(&self.client, Some(c) if !c.is_closed()) {
            self.client = Some(wire::connect_sql(source).await?);
        }
        let Some(client) = self.client.as_ref() else {
            return Ok(false);
        };
        let messages = client.simple_query(&fill.sql).await?;
        let Some(row) = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            tracing::warn!(relation = change.relation_id, "a TOASTed column was unchanged, and the row is gone by now; its delete follows in the stream");
            return Ok(false);
        };
        let Some(new) = change.new.as_mut() else {
            return Ok(false);
        };
        for (i, &column) in fill.columns.iter().enumerate() {
            if let Some(slot) = new.get_mut(column) {
                *slot = match row.get(i) {
                    Some(text) => TupleValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => TupleValue::Null,
                };
            }
        }
        Ok(true)
    }
}
