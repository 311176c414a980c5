// Drives the official novita-sdk (3.1.3) against a live server: submit img2img, poll, list models.
// Usage: node sdk_flow.js <baseUrl> <apiKey> <modelName> <imageBase64File>
const { NovitaSDK, TaskStatus } = require("novita-sdk");
const fs = require("fs");

async function main() {
  const [baseUrl, key, model, imageFile] = process.argv.slice(2);
  const sdk = new NovitaSDK(key);
  sdk.setBaseUrl(baseUrl);
  const image = fs.readFileSync(imageFile, "utf8");
  const submitted = await sdk.img2Img({
    request: {
      model_name: model, image_base64: image, prompt: "a lighthouse", width: 128, height: 128,
      image_num: 1, steps: 4, seed: 7, guidance_scale: 7, sampler_name: "Euler a", strength: 0.6,
    },
  });
  let progress;
  for (let i = 0; i < 600; i++) {
    progress = await sdk.progress({ task_id: submitted.task_id });
    if (progress.task.status === TaskStatus.SUCCEED || progress.task.status === TaskStatus.FAILED) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const models = await sdk.getModels({ filter: { types: "checkpoint" }, pagination: { limit: 10, cursor: "c_0" } });
  let error = null;
  try {
    await sdk.progress({ task_id: "does-not-exist" });
  } catch (e) {
    error = { code: e.code, reason: e.reason, msg: e.msg };
  }
  console.log(JSON.stringify({ task_id: submitted.task_id, progress, models, error }));
}

main().catch((e) => {
  console.error(JSON.stringify({ fatal: String(e), code: e.code, reason: e.reason, msg: e.msg }));
  process.exit(1);
});
