// Drives the npm package `braze-api` (github.com/braze-community/braze-node), a Braze REST
// client nobody on this project wrote, against whatever BRAZE_URL points at. Called by
// tests/it/braze_client.rs with one step name; prints one JSON line with what the client
// returned or threw, so the test can check it.
'use strict';
const { Braze } = require('braze-api');

const braze = new Braze(process.env.BRAZE_URL, process.env.BRAZE_KEY);
const T = '2026-11-28T10:00:00.000Z';

const steps = {
  // Every array, several identifier forms, nested and array attributes.
  track: () =>
    braze.users.track({
      attributes: [
        { external_id: 'node-1', first_name: 'Grace', tier: 'gold', tags: ['a', 'b'] },
        { external_id: 'node-2', _update_existing_only: false, address: { city: 'Oslo' } },
        { user_alias: { alias_name: 'node-alias', alias_label: 'crm' }, score: 7 },
        { external_id: 'node-1', pets: { add: ['cat'] } },
      ],
      events: [
        { external_id: 'node-1', name: 'signed_up', time: T, properties: { plan: 'pro' } },
        { braze_id: 'node-b', app_id: 'app', name: 'opened', time: T },
      ],
      purchases: [
        { external_id: 'node-2', product_id: 'sku-1', currency: 'USD', price: 9.99, quantity: 3, time: T },
      ],
    }),
  // The same call with its bulk header, as the client offers it.
  bulk: () =>
    braze.users.track({ attributes: [{ external_id: 'node-3', bulk: true }] }, true),
  // One object Braze would refuse beside one it takes: a success with errors.
  partial: () =>
    braze.users.track({
      events: [
        { external_id: 'node-1', name: 'ok', time: T },
        { name: 'no user', time: T },
      ],
    }),
  // Nothing usable: the client throws what the relay answered.
  invalid: () => braze.users.track({ events: [{ name: 'no user', time: T }] }),
  // A lookup goes through to Braze and back.
  export: () =>
    braze.users.export.ids({
      external_ids: ['node-1', 'nobody'],
      fields_to_export: ['external_id', 'custom_attributes'],
    }),
};

const step = steps[process.argv[2]];
if (!step) {
  console.error(`unknown step ${process.argv[2]}; one of ${Object.keys(steps).join(', ')}`);
  process.exit(2);
}
step().then(
  (answer) => console.log(JSON.stringify({ ok: true, answer })),
  (e) => console.log(JSON.stringify({ ok: false, status: e.status, message: e.message, errors: e.errors })),
);
