//! Accounts and the catalogue: opening an account, the plans published from the fixtures, single-account
//! commands and adjustments.

use super::*;

impl Flows {
    pub async fn sync_catalog(&self, fixtures: Fixtures, metadata: &Metadata) -> Result<usize> {
        let at = self.now();
        let committed = self
            .handler
            .execute::<Catalog>(
                CATALOG_STREAM,
                CatalogCommand::Sync {
                    fixtures,
                    effective_at: at,
                },
                metadata,
            )
            .await
            .map_err(map_single)?;
        Ok(committed.value.len())
    }

    pub async fn open_account(
        &self,
        account_id: AccountId,
        name: &str,
        email: &str,
        currency: Currency,
        country: Country,
        metadata: &Metadata,
    ) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        let command = AccountCommand::Open {
            account_id,
            name: name.to_string(),
            email: email.to_string(),
            currency,
            country,
            at: self.now(),
        };
        self.handler
            .execute::<Account>(&account_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?;
        Ok(())
    }

    pub async fn account_command(&self, account_id: AccountId, command: AccountCommand, metadata: &Metadata) -> Result<Vec<AccountEvent>> {
        Ok(self
            .handler
            .execute::<Account>(&account_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?
            .value)
    }

    pub async fn adjust(&self, account_id: AccountId, amount: Decimal, reason: &str, metadata: &Metadata) -> Result<AdjustmentId> {
        let adjustment_id = AdjustmentId(metadata.id_for("adjustment"));
        if self.replayed(metadata).await? {
            return Ok(adjustment_id);
        }
        self.account_command(
            account_id,
            AccountCommand::Adjust {
                adjustment_id,
                amount,
                reason: reason.to_string(),
            },
            metadata,
        )
        .await?;
        Ok(adjustment_id)
    }
}
