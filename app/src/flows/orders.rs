//! Deploy orders: the first hour held with the order and the server, then captured when the
//! provider made the server or released when it could not.

use super::*;

impl Flows {
    /// The net and tax of a server's first hour for an account, at the current price.
    pub(super) async fn first_hour(
        &self,
        unit: &mut crate::handler::Unit,
        account: &Account,
        plan_id: &PlanId,
        at: DateTime<Utc>,
    ) -> Result<(Decimal, Decimal, TaxRate)> {
        let opened = account.opened().ok_or(FlowError::NotFound("account"))?;
        let catalog = unit_load::<Catalog>(unit, CATALOG_STREAM).await?;
        catalog.state.orderable(plan_id, at)?;
        let price = catalog
            .state
            .monthly_price(plan_id, opened.currency, at)
            .ok_or_else(|| FlowError::Invalid {
                field: "plan_id",
                reason: format!("{plan_id} has no price in {}", opened.currency),
            })?;
        let tax_rate = catalog.state.tax_rate(opened.country, at);
        let charge = domain::billing::slot_charge(price.amount, Decimal::ZERO, tax_rate);
        Ok((charge.net, charge.tax, tax_rate))
    }

    /// Places a deploy order: the first hour is held on the wallet, the order and the server recorded.
    pub async fn place_order(
        &self,
        account_id: AccountId,
        plan_id: PlanId,
        location: Location,
        order_id: OrderId,
        server_id: ServerId,
        metadata: &Metadata,
    ) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            catalog.state.serves(&location)?;
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            let (net, tax, _) = self.first_hour(&mut unit, &account.state, &plan_id, at).await?;
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            unit.handle(
                &mut account,
                AccountCommand::PlaceHold {
                    order_id,
                    server_id,
                    net,
                    tax,
                },
            )
            .await?;
            unit.handle(
                &mut order,
                OrderCommand::Place {
                    order_id,
                    account_id,
                    server_id,
                    plan_id: plan_id.clone(),
                    location: location.clone(),
                    net,
                    tax,
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut server,
                ServerCommand::Order {
                    server_id,
                    account_id,
                    order_id,
                    plan_id: plan_id.clone(),
                    location: location.clone(),
                    at,
                },
            )
            .await?;
        });
        Ok(())
    }

    /// Provisioning succeeded: the server needs setup and the hold becomes the first hour's charge.
    pub async fn complete_provisioning(&self, order_id: OrderId, provider_server_id: &str, metadata: &Metadata) -> Result<ChargeId> {
        let at = self.now();
        let charge_id = ChargeId::new();
        atomically!(self, metadata, |unit| {
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let placed = order.state.placed.clone().ok_or(FlowError::NotFound("order"))?;
            let mut server = unit_load::<Server>(&mut unit, &placed.server_id.stream_id()).await?;
            let mut account = unit_load::<Account>(&mut unit, &placed.account_id.stream_id()).await?;
            let country = account.state.opened().ok_or(FlowError::NotFound("account"))?.country;
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let tax_rate = catalog.state.tax_rate(country, at);
            unit.handle(&mut order, OrderCommand::Complete { charge_id, at }).await?;
            unit.handle(
                &mut server,
                ServerCommand::CompleteProvisioning {
                    provider_server_id: provider_server_id.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut account,
                AccountCommand::CaptureHold {
                    order_id,
                    charge_id,
                    plan_id: placed.plan_id.clone(),
                    slot: HourSlot::containing(at),
                    tax_rate,
                },
            )
            .await?;
        });
        Ok(charge_id)
    }

    /// Provisioning failed: the hold is released in full.
    pub async fn fail_provisioning(&self, order_id: OrderId, reason: &str, metadata: &Metadata) -> Result<()> {
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let placed = order.state.placed.clone().ok_or(FlowError::NotFound("order"))?;
            let mut server = unit_load::<Server>(&mut unit, &placed.server_id.stream_id()).await?;
            let mut account = unit_load::<Account>(&mut unit, &placed.account_id.stream_id()).await?;
            unit.handle(
                &mut order,
                OrderCommand::Fail {
                    reason: reason.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut server,
                ServerCommand::FailProvisioning {
                    reason: reason.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut account,
                AccountCommand::ReleaseHold {
                    order_id,
                    reason: reason.to_string(),
                },
            )
            .await?;
        });
        Ok(())
    }
}
