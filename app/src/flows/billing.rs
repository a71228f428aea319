//! Hourly billing: one (server, slot) at a time, or a batch of accounts in one append; and the
//! catch-up of hours owed before billing stops.

use super::*;

impl Flows {
    /// Charges one (server, slot) at the price in force at the slot; declined for lack of funds,
    /// the server is suspended in the same append.
    pub async fn charge_slot(&self, server_id: ServerId, slot: HourSlot, metadata: &Metadata) -> Result<SlotOutcome> {
        let at = self.now();
        let charge_id = ChargeId::new();
        let outcome = atomically!(self, metadata, |unit| {
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            let ordered = server.state.ordered.clone().ok_or(FlowError::NotFound("server"))?;
            // A slot not begun yet is not billable; charging it would settle the slots before it.
            if !server.state.may_bill(slot) || slot > HourSlot::containing(at) {
                break SlotOutcome::NotBillable;
            }
            let mut account = unit_load::<Account>(&mut unit, &ordered.account_id.stream_id()).await?;
            if account.state.is_charged(server_id, slot) {
                break SlotOutcome::AlreadyCharged;
            }
            let opened = account.state.opened().cloned().ok_or(FlowError::NotFound("account"))?;
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let command = slot_charge(&catalog.state, server_id, &ordered.plan_id, &opened, charge_id, slot)?;
            let events = unit.handle(&mut account, command).await?;
            match events.as_slice() {
                [AccountEvent::HourCharged { capped, .. }] => SlotOutcome::Charged {
                    charge_id,
                    capped: *capped,
                },
                [AccountEvent::ChargeDeclined { .. }] => {
                    unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                    SlotOutcome::DeclinedAndSuspended
                }
                other => unreachable!("a slot charge decides one event, got {other:?}"),
            }
        });
        Ok(outcome)
    }

    /// Charges, in one atomic append, every due slot of a batch of accounts' servers: for each
    /// account the servers listed with the first slot each may owe, up to and including `until`
    /// (at most `slots_max` slots a server). The wallets and the catalogue are read in one round
    /// trip each, every decision is the domain's (`ChargeSlot`, and `Suspend` on a decline, after
    /// which that server is not charged further), and the append carries every stream's expected
    /// version: a batch that races another billing run is decided again from fresh state, where
    /// the other run's slots are already charged.
    ///
    /// A server comes with what billing needs of it (its plan, the slot from which it may be
    /// billed) as the servers read model folded it from its stream up to version `version`, at
    /// the read model's checkpoint `seen_at`; it is not read from the log then, and the append
    /// is guarded by that version instead. A server without them, or any server once an attempt
    /// lost a race (its stream may have moved since the read model was read), is folded from its
    /// stream. So is a server whose charge is declined, to suspend it; if its stream has moved
    /// since, the batch is decided again with every server folded.
    pub async fn charge_due_batch(
        &self,
        due: &[(AccountId, Vec<DueServer>, usize)],
        until: HourSlot,
        seen_at: Option<ledger::SeenAt>,
        metadata: &Metadata,
    ) -> Result<BatchCharges> {
        let at = self.now();
        let account_streams: Vec<String> = due.iter().map(|(account_id, _, _)| account_id.stream_id()).collect();
        let outcome = atomically!(self, metadata, |unit, attempt| {
            // Only the first attempt trusts the read model: a retry means some stream moved.
            let trusted = attempt == 1 && seen_at.is_some();
            let server_streams: Vec<String> = due
                .iter()
                .flat_map(|(_, servers, _)| servers.iter())
                .filter(|server| server.folded_if(trusted).is_none())
                .map(|server| server.server_id.stream_id())
                .collect();
            let mut outcome = BatchCharges::default();
            let mut stale = false;
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let mut accounts = unit.load_many::<Account>(&account_streams).await?;
            let mut servers = unit.load_many::<Server>(&server_streams).await?.into_iter();
            'accounts: for ((_, due_servers, slots_max), account) in due.iter().zip(accounts.iter_mut()) {
                let Some(opened) = account.state.opened().cloned() else {
                    outcome.skipped += due_servers.len() as u64;
                    let loaded = due_servers.iter().filter(|server| server.folded_if(trusted).is_none()).count();
                    servers.by_ref().take(loaded).for_each(drop);
                    continue;
                };
                for due_server in due_servers {
                    let server_id = due_server.server_id;
                    // What billing needs of the server: as the read model folded it (the append
                    // guarded by its version), or from its stream.
                    let (plan_id, billable_from, mut server) = match due_server.folded_if(trusted) {
                        Some(folded) => {
                            unit.expect_version(&server_id.stream_id(), folded.version, seen_at);
                            (folded.plan_id.clone(), folded.billable_from, None)
                        }
                        None => {
                            let server = servers.next().expect("a server loaded for each one not folded");
                            let Some(ordered) = server.state.ordered.clone() else {
                                outcome.skipped += 1;
                                continue;
                            };
                            if ordered.account_id != opened.account_id {
                                outcome.skipped += 1;
                                continue;
                            }
                            // The read model's next slot may predate a resumption it has not
                            // seen yet; the server itself says from which slot it may be billed.
                            let Some(billable_from) = server.state.first_billable_slot() else {
                                continue;
                            };
                            (ordered.plan_id, billable_from, Some(server))
                        }
                    };
                    let mut slot = due_server.first.max(billable_from);
                    let mut slots = 0;
                    while slot <= until && slots < *slots_max {
                        if !account.state.is_charged(server_id, slot) {
                            let command = slot_charge(&catalog.state, server_id, &plan_id, &opened, ChargeId::new(), slot)?;
                            let events = unit.handle(account, command).await?;
                            if let [AccountEvent::ChargeDeclined { .. }] = events.as_slice() {
                                let mut server = match server.take() {
                                    Some(server) => server,
                                    None => {
                                        let server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
                                        if Some(server.version) != due_server.folded_if(trusted).map(|folded| folded.version) {
                                            stale = true;
                                            break 'accounts;
                                        }
                                        server
                                    }
                                };
                                unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                                outcome.declined += 1;
                                break;
                            }
                            outcome.charged += 1;
                        }
                        slot = slot.next();
                        slots += 1;
                    }
                }
            }
            if stale {
                continue;
            }
            outcome
        });
        Ok(outcome)
    }
}

/// A server of a billing batch (`Flows::charge_due_batch`): the first slot it may owe, and what
/// billing needs of it as the servers read model folded it, when the read model knows its
/// stream's version.
#[derive(Clone, Debug)]
pub struct DueServer {
    pub server_id: ServerId,
    pub first: HourSlot,
    pub folded: Option<FoldedServer>,
}

impl DueServer {
    /// What the read model folded, if it is to be trusted.
    fn folded_if(&self, trusted: bool) -> Option<&FoldedServer> {
        self.folded.as_ref().filter(|_| trusted)
    }
}

/// What billing needs of a billable server, folded from its stream up to `version`.
#[derive(Clone, Debug)]
pub struct FoldedServer {
    pub plan_id: PlanId,
    /// `Server::first_billable_slot` at `version`.
    pub billable_from: HourSlot,
    pub version: i64,
}

/// The charge of one (server, slot) at the plan's price and the country's tax in force at the slot.
pub(super) fn slot_charge(
    catalog: &Catalog,
    server_id: ServerId,
    plan_id: &PlanId,
    opened: &domain::account::Opened,
    charge_id: ChargeId,
    slot: HourSlot,
) -> Result<AccountCommand> {
    let price = catalog
        .monthly_price(plan_id, opened.currency, slot.start())
        .ok_or(FlowError::NotFound("price for the slot"))?;
    Ok(AccountCommand::ChargeSlot {
        charge_id,
        server_id,
        plan_id: plan_id.clone(),
        slot,
        monthly_price: price.amount,
        tax_rate: catalog.tax_rate(opened.country, slot.start()),
    })
}

/// What billing a slot decided: charged (in full, or its unused time charged again), declined, or
/// nothing (it was paid).
pub(super) fn billed(events: &[AccountEvent]) -> SlotOutcome {
    match events {
        [] => SlotOutcome::AlreadyCharged,
        [AccountEvent::ChargeDeclined { .. }] => SlotOutcome::DeclinedAndSuspended,
        [AccountEvent::HourCharged { charge_id, capped, .. }] => SlotOutcome::Charged {
            charge_id: *charge_id,
            capped: *capped,
        },
        [AccountEvent::UnusedTimeRecharged { charge_id, .. }] => SlotOutcome::Charged {
            charge_id: *charge_id,
            capped: false,
        },
        other => unreachable!("billing a slot decides at most one event, got {other:?}"),
    }
}

/// Charges every slot of a billable server that is due by `at` and not charged yet (the billing
/// run charges them too; after downtime it may not have yet), as the run decides them: from the
/// slot after the last charged (or the slot it became billable in), each at the price in force at
/// it. Declined, the server is suspended and nothing more is charged. Called before billing
/// stops (a cancellation, a suspension), so the hours owed until then are never lost.
pub(super) async fn catch_up(
    unit: &mut crate::handler::Unit,
    server: &mut crate::handler::Loaded<Server>,
    account: &mut crate::handler::Loaded<Account>,
    catalog: &Catalog,
    at: DateTime<Utc>,
) -> Result<()> {
    let (Some(first), Some(ordered), Some(opened)) = (
        server.state.first_billable_slot(),
        server.state.ordered.clone(),
        account.state.opened().cloned(),
    ) else {
        return Ok(());
    };
    let mut slot = account
        .state
        .last_charged_slot(ordered.server_id)
        .map_or(first, |last| last.next().max(first));
    let until = HourSlot::containing(at);
    let mut slots = 0;
    while slot <= until && slots < CATCH_UP_SLOTS_MAX {
        if !account.state.is_charged(ordered.server_id, slot) {
            let command = slot_charge(catalog, ordered.server_id, &ordered.plan_id, &opened, ChargeId::new(), slot)?;
            if let [AccountEvent::ChargeDeclined { .. }] = unit.handle(account, command).await?.as_slice() {
                unit.handle(server, suspend_for_non_payment(at)).await?;
                break;
            }
        }
        slot = slot.next();
        slots += 1;
    }
    Ok(())
}

/// Slots one server is caught up by at once, at most (a bound on one append).
pub(super) const CATCH_UP_SLOTS_MAX: usize = 24 * 62;

/// Charges what `servers` owe up to `at` (`catch_up`), before something stops their billing.
pub(super) async fn catch_up_all(
    unit: &mut crate::handler::Unit,
    account: &mut crate::handler::Loaded<Account>,
    servers: &[ServerId],
    at: DateTime<Utc>,
) -> Result<()> {
    if servers.is_empty() {
        return Ok(());
    }
    let catalog = unit_load::<Catalog>(unit, CATALOG_STREAM).await?;
    for server_id in servers {
        let mut server = unit_load::<Server>(unit, &server_id.stream_id()).await?;
        catch_up(unit, &mut server, account, &catalog.state, at).await?;
    }
    Ok(())
}
